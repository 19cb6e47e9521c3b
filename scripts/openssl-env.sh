# Sourced by every script that runs cargo for this machine's architecture:
# NBD TLS links OpenSSL (the openssl crate). Without these variables cargo
# builds OpenSSL from source (the `vendored` feature, about 2 minutes on 2
# cores); with them it links Debian's libssl.a and libcrypto.a statically:
# seconds to build, and no libssl.so.3 needed where the binary runs. One
# setting for all scripts, so that a benchmark run after the tests does not
# rebuild what the tests built (cargo rebuilds when these change).
# scripts/arm64.sh unsets them: the cross-build vendors OpenSSL.
export OPENSSL_NO_VENDOR=1 OPENSSL_STATIC=1
OPENSSL_LIB_DIR="/usr/lib/$(gcc -dumpmachine)"
export OPENSSL_LIB_DIR OPENSSL_INCLUDE_DIR=/usr/include
