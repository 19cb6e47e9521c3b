//! Login (RFC 7143 §6, §13): the security stage (AuthMethod, CHAP), the
//! operational parameter negotiation, and the transition to the full
//! feature phase. A pure state machine: [`Login::step`] takes one Login
//! Request and returns the response to send and whether login goes on,
//! succeeded ([`Negotiated`]) or failed (the response carries the status).
//!
//! The target's side of negotiation: digests are chosen from the
//! initiator's list in its order (CRC32C and None are known);
//! MaxBurstLength, FirstBurstLength and MaxOutstandingR2T take the minimum
//! of both sides; InitialR2T is OR and ImmediateData AND with this
//! target's `No`/`Yes`; ErrorRecoveryLevel is 0, MaxConnections 1,
//! DataPDUInOrder and DataSequenceInOrder are Yes, markers are off.
//! Unknown keys are answered `NotUnderstood`.

use bytes::Bytes;
use rand::RngCore;

use super::chap::{self, ChapConfig, CHALLENGE_LEN, MAX_CHALLENGE};
use super::pdu::{login_response, LoginRequest, OutPdu};
use super::text::{encode_text, parse_text};

/// Data segment this target accepts in one PDU (declared
/// MaxRecvDataSegmentLength).
pub const OUR_MAX_RECV: u32 = 256 * 1024;
/// Largest data segment of a Login PDU (the default MaxRecvDataSegmentLength).
pub const LOGIN_MAX_DATA: u32 = 8192;
/// Largest text accumulated over Login PDUs with the C bit.
pub const LOGIN_MAX_TEXT: usize = 64 * 1024;
pub const OUR_MAX_BURST: u32 = 1 << 20;
pub const OUR_FIRST_BURST: u32 = 256 * 1024;
pub const OUR_MAX_OUTSTANDING_R2T: u32 = 4;
/// DefaultTime2Wait this target asks for (seconds).
pub const OUR_TIME2WAIT: u32 = 2;

// Login status (class, detail), §11.13.5.
pub const SUCCESS: (u8, u8) = (0, 0);
pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
pub const AUTH_FAILED: (u8, u8) = (2, 1);
pub const NOT_FOUND: (u8, u8) = (2, 3);
pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
pub const TOO_MANY_CONNECTIONS: (u8, u8) = (2, 6);
pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
pub const SESSION_TYPE_UNSUPPORTED: (u8, u8) = (2, 9);
pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 0x0a);
pub const INVALID_DURING_LOGIN: (u8, u8) = (2, 0x0b);

/// Stages (CSG/NSG values).
pub const SECURITY: u8 = 0;
pub const OPERATIONAL: u8 = 1;
pub const FULL_FEATURE: u8 = 3;

/// What the target serves: used by login and by SendTargets.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub target_name: String,
    pub chap: Option<ChapConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

/// Session parameters in force after login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment the target may send (the initiator's
    /// MaxRecvDataSegmentLength).
    pub send_max: u32,
    /// Largest data segment the target accepts.
    pub recv_max: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
}

impl Default for Params {
    /// The RFC 7143 defaults, before anything is negotiated.
    fn default() -> Params {
        Params {
            header_digest: false,
            data_digest: false,
            send_max: 8192,
            recv_max: OUR_MAX_RECV,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
        }
    }
}

/// A successful login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub isid: [u8; 6],
    pub params: Params,
    /// The CmdSN the first full-feature command will carry.
    pub cmdsn: u32,
}

/// The outcome of one login step.
#[derive(Debug)]
pub enum Step {
    /// Send the response and wait for the next request.
    Continue(OutPdu),
    /// Send the response; the connection is in the full feature phase.
    Done(OutPdu, Negotiated),
    /// Send the response (carrying an error status) and close.
    Fail(OutPdu),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// Nothing negotiated yet.
    Start,
    /// AuthMethod=None agreed (or no CHAP configured and not asked).
    Open,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    WantAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    WantResponse { id: u8, challenge: Vec<u8> },
    /// CHAP succeeded.
    Passed,
}

/// One connection's login.
pub struct Login<'a> {
    cfg: &'a TargetConfig,
    first: bool,
    stage: u8,
    isid: [u8; 6],
    initiator_name: Option<String>,
    session_type: SessionType,
    auth: Auth,
    params: Params,
    declared_recv: bool,
    text: Vec<u8>,
    cmdsn: u32,
}

impl<'a> Login<'a> {
    pub fn new(cfg: &'a TargetConfig) -> Login<'a> {
        Login {
            cfg,
            first: true,
            stage: SECURITY,
            isid: [0; 6],
            initiator_name: None,
            session_type: SessionType::Normal,
            auth: Auth::Start,
            params: Params::default(),
            declared_recv: false,
            text: Vec::new(),
            cmdsn: 0,
        }
    }

    /// The TSIH the initiator asked for in its first PDU is checked by the
    /// caller (who knows the sessions); this handles everything else.
    pub fn step(&mut self, req: &LoginRequest, rng: &mut dyn RngCore) -> Step {
        let fail = |status| {
            Step::Fail(login_response(
                req,
                false,
                req.csg,
                0,
                0,
                status,
                Bytes::new(),
            ))
        };
        if req.version_min > 0 {
            return fail(UNSUPPORTED_VERSION);
        }
        if self.first {
            self.isid = req.isid;
            self.cmdsn = req.cmdsn;
            self.stage = req.csg;
        } else if req.isid != self.isid {
            return fail(INITIATOR_ERROR);
        }
        if req.csg != self.stage || req.csg > OPERATIONAL {
            return fail(INVALID_DURING_LOGIN);
        }
        if req.transit && (req.nsg <= req.csg || req.nsg == 2) {
            return fail(INVALID_DURING_LOGIN);
        }
        if self.text.len() + req.data.len() > LOGIN_MAX_TEXT {
            return fail(INITIATOR_ERROR);
        }
        self.text.extend_from_slice(&req.data);
        if req.continue_ {
            // More text follows: acknowledge with an empty response.
            return Step::Continue(login_response(
                req,
                false,
                self.stage,
                0,
                0,
                SUCCESS,
                Bytes::new(),
            ));
        }
        let text = std::mem::take(&mut self.text);
        let pairs = match parse_text(&text) {
            Ok(p) => p,
            Err(_) => return fail(INITIATOR_ERROR),
        };
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.as_str())
        };

        let mut out: Vec<(String, String)> = Vec::new();
        if self.first {
            self.first = false;
            match get("InitiatorName") {
                Some(n) if !n.is_empty() => self.initiator_name = Some(n.to_string()),
                _ => return fail(MISSING_PARAMETER),
            }
            self.session_type = match get("SessionType") {
                None | Some("Normal") => SessionType::Normal,
                Some("Discovery") => SessionType::Discovery,
                Some(_) => return fail(SESSION_TYPE_UNSUPPORTED),
            };
            if self.session_type == SessionType::Normal {
                match get("TargetName") {
                    Some(t) if t == self.cfg.target_name => {}
                    Some(_) => return fail(NOT_FOUND),
                    None => return fail(MISSING_PARAMETER),
                }
                out.push(("TargetPortalGroupTag".into(), "1".into()));
            }
        }

        // Security keys.
        if let Some(methods) = get("AuthMethod") {
            if self.stage != SECURITY || self.auth != Auth::Start {
                return fail(INITIATOR_ERROR);
            }
            let offered: Vec<&str> = methods.split(',').collect();
            if self.cfg.chap.is_some() {
                if !offered.contains(&"CHAP") {
                    return fail(AUTH_FAILED);
                }
                self.auth = Auth::WantAlgorithm;
                out.push(("AuthMethod".into(), "CHAP".into()));
            } else if offered.contains(&"None") {
                self.auth = Auth::Open;
                out.push(("AuthMethod".into(), "None".into()));
            } else {
                return fail(AUTH_FAILED);
            }
        }
        if let Some(algs) = get("CHAP_A") {
            if self.auth != Auth::WantAlgorithm {
                return fail(INITIATOR_ERROR);
            }
            if !algs.split(',').any(|a| a == "5") {
                return fail(AUTH_FAILED);
            }
            let mut id = [0u8; 1];
            rng.fill_bytes(&mut id);
            let mut challenge = vec![0u8; CHALLENGE_LEN];
            rng.fill_bytes(&mut challenge);
            out.push(("CHAP_A".into(), "5".into()));
            out.push(("CHAP_I".into(), id[0].to_string()));
            out.push(("CHAP_C".into(), chap::encode_hex(&challenge)));
            self.auth = Auth::WantResponse {
                id: id[0],
                challenge,
            };
        }
        if get("CHAP_R").is_some() || get("CHAP_N").is_some() {
            let Auth::WantResponse { id, challenge } = self.auth.clone() else {
                return fail(INITIATOR_ERROR);
            };
            let Some(cfg) = &self.cfg.chap else {
                return fail(AUTH_FAILED);
            };
            let (Some(name), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
                return fail(AUTH_FAILED);
            };
            let Some(resp) = chap::decode_binary(resp, 64) else {
                return fail(AUTH_FAILED);
            };
            let want = chap::response(id, &cfg.initiator.secret, &challenge);
            if name != cfg.initiator.user || !chap::same(&resp, &want) {
                return fail(AUTH_FAILED);
            }
            match (get("CHAP_I"), get("CHAP_C")) {
                (None, None) => {}
                (Some(i), Some(c)) => {
                    let Some(m) = &cfg.mutual else {
                        return fail(AUTH_FAILED);
                    };
                    let (Ok(i), Some(c)) = (i.parse::<u8>(), chap::decode_binary(c, MAX_CHALLENGE))
                    else {
                        return fail(AUTH_FAILED);
                    };
                    if chap::same(&c, &challenge) {
                        return fail(AUTH_FAILED); // a reflected challenge
                    }
                    out.push(("CHAP_N".into(), m.user.clone()));
                    out.push((
                        "CHAP_R".into(),
                        chap::encode_hex(&chap::response(i, &m.secret, &c)),
                    ));
                }
                _ => return fail(AUTH_FAILED),
            }
            self.auth = Auth::Passed;
        }

        // Operational keys (accepted in either stage).
        for (k, v) in &pairs {
            if let Some(answer) = self.negotiate(k, v) {
                out.push((k.clone(), answer));
            }
        }
        if self.stage == OPERATIONAL || (req.transit && req.nsg == FULL_FEATURE) {
            self.declare_recv(&mut out);
        }

        // May the stage change?
        let authenticated = match self.auth {
            Auth::Passed => true,
            Auth::Open | Auth::Start => self.cfg.chap.is_none(),
            Auth::WantAlgorithm | Auth::WantResponse { .. } => false,
        };
        if self.stage == OPERATIONAL && !authenticated {
            return fail(AUTH_FAILED);
        }
        let in_progress = matches!(self.auth, Auth::WantAlgorithm | Auth::WantResponse { .. });
        let transit = req.transit && !in_progress;
        if req.transit && !in_progress && !authenticated {
            return fail(AUTH_FAILED);
        }
        let data = Bytes::from(encode_text(&out));
        let resp = login_response(req, transit, self.stage, req.nsg, 0, SUCCESS, data);
        if transit {
            self.stage = req.nsg;
            if req.nsg == FULL_FEATURE {
                let mut params = self.params;
                params.first_burst = params.first_burst.min(params.max_burst);
                return Step::Done(
                    resp,
                    Negotiated {
                        session_type: self.session_type,
                        initiator_name: self.initiator_name.clone().unwrap_or_default(),
                        isid: self.isid,
                        params,
                        cmdsn: self.cmdsn,
                    },
                );
            }
        }
        Step::Continue(resp)
    }

    fn declare_recv(&mut self, out: &mut Vec<(String, String)>) {
        if !self.declared_recv {
            self.declared_recv = true;
            out.push(("MaxRecvDataSegmentLength".into(), OUR_MAX_RECV.to_string()));
        }
    }

    /// The answer to one operational key, or `None` for keys answered
    /// elsewhere or not at all (declarations).
    fn negotiate(&mut self, key: &str, value: &str) -> Option<String> {
        let p = &mut self.params;
        let yes_no = |v: &str| match v {
            "Yes" => Some(true),
            "No" => Some(false),
            _ => None,
        };
        let yn = |b: bool| if b { "Yes" } else { "No" }.to_string();
        Some(match key {
            "InitiatorName" | "InitiatorAlias" | "SessionType" | "TargetName" | "AuthMethod"
            | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => return None,
            "HeaderDigest" | "DataDigest" => {
                let pick = value.split(',').find(|d| *d == "CRC32C" || *d == "None");
                let Some(d) = pick else {
                    return Some("Reject".into());
                };
                let on = d == "CRC32C";
                if key == "HeaderDigest" {
                    p.header_digest = on;
                } else {
                    p.data_digest = on;
                }
                d.to_string()
            }
            "MaxRecvDataSegmentLength" => {
                match number(value).filter(|n| (512..=0xff_ffff).contains(n)) {
                    Some(n) => p.send_max = n,
                    None => return Some("Reject".into()),
                }
                return None; // declarative: ours is declared separately
            }
            "MaxBurstLength" | "FirstBurstLength" => {
                let Some(n) = number(value).filter(|n| (512..=0xff_ffff).contains(n)) else {
                    return Some("Reject".into());
                };
                if key == "MaxBurstLength" {
                    p.max_burst = n.min(OUR_MAX_BURST);
                    p.max_burst.to_string()
                } else {
                    p.first_burst = n.min(OUR_FIRST_BURST);
                    p.first_burst.to_string()
                }
            }
            "MaxOutstandingR2T" => {
                let Some(n) = number(value).filter(|n| (1..=65535).contains(n)) else {
                    return Some("Reject".into());
                };
                p.max_outstanding_r2t = n.min(OUR_MAX_OUTSTANDING_R2T);
                p.max_outstanding_r2t.to_string()
            }
            "InitialR2T" => {
                let Some(b) = yes_no(value) else {
                    return Some("Reject".into());
                };
                p.initial_r2t = b; // OR with our "No"
                yn(b)
            }
            "ImmediateData" => {
                let Some(b) = yes_no(value) else {
                    return Some("Reject".into());
                };
                p.immediate_data = b; // AND with our "Yes"
                yn(b)
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                yes_no(value)?;
                "Yes".into() // OR with our "Yes"
            }
            "MaxConnections" => {
                number(value)?;
                "1".into()
            }
            "ErrorRecoveryLevel" => {
                number(value)?;
                "0".into()
            }
            "DefaultTime2Wait" => number(value)?.max(OUR_TIME2WAIT).to_string(),
            "DefaultTime2Retain" => {
                number(value)?;
                "0".into()
            }
            "IFMarker" | "OFMarker" => "No".into(),
            "IFMarkInt" | "OFMarkInt" => "Irrelevant".into(),
            _ => "NotUnderstood".into(),
        })
    }
}

/// A decimal or `0x` hexadecimal number.
fn number(s: &str) -> Option<u32> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::super::chap::Credential;
    use super::super::text::parse_text;
    use super::*;
    use rand::SeedableRng;

    const TARGET: &str = "iqn.2026-11.io.strata:vol";

    fn cfg(chap: Option<ChapConfig>) -> TargetConfig {
        TargetConfig {
            target_name: TARGET.into(),
            chap,
        }
    }

    fn req(csg: u8, nsg: u8, transit: bool, text: &str) -> LoginRequest {
        LoginRequest {
            transit,
            continue_: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmdsn: 5,
            exp_statsn: 0,
            data: Bytes::from(text.replace('|', "\0")),
        }
    }

    fn pairs(p: &OutPdu) -> Vec<(String, String)> {
        parse_text(&p.data).unwrap()
    }

    fn status(p: &OutPdu) -> (u8, u8) {
        (p.bhs[36], p.bhs[37])
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(1)
    }

    #[test]
    fn no_auth_straight_to_full_feature() {
        let c = cfg(None);
        let mut l = Login::new(&c);
        let text =
            format!("InitiatorName=iqn.i|SessionType=Normal|TargetName={TARGET}|AuthMethod=None|");
        let Step::Continue(r) = l.step(&req(0, 1, true, &text), &mut rng()) else {
            panic!()
        };
        assert_eq!(r.bhs[1], 0x80 | 0x01, "T, CSG 0, NSG 1");
        assert!(pairs(&r).contains(&("AuthMethod".into(), "None".into())));
        let ops = "HeaderDigest=None,CRC32C|DataDigest=CRC32C,None|MaxRecvDataSegmentLength=65536|\
                   MaxBurstLength=16776192|FirstBurstLength=262144|InitialR2T=No|ImmediateData=Yes|\
                   MaxOutstandingR2T=8|ErrorRecoveryLevel=2|DefaultTime2Wait=0|X-com.foo=1|";
        let Step::Done(r, n) = l.step(&req(1, 3, true, ops), &mut rng()) else {
            panic!()
        };
        assert_eq!(r.bhs[1], 0x80 | 0x04 | 0x03);
        let got = pairs(&r);
        for want in [
            ("HeaderDigest", "None"),
            ("DataDigest", "CRC32C"),
            ("MaxBurstLength", "1048576"),
            ("FirstBurstLength", "262144"),
            ("InitialR2T", "No"),
            ("MaxOutstandingR2T", "4"),
            ("ErrorRecoveryLevel", "0"),
            ("DefaultTime2Wait", "2"),
            ("X-com.foo", "NotUnderstood"),
            ("MaxRecvDataSegmentLength", "262144"),
        ] {
            assert!(
                got.contains(&(want.0.into(), want.1.into())),
                "{want:?} in {got:?}"
            );
        }
        assert!(!n.params.header_digest && n.params.data_digest);
        assert_eq!(n.params.send_max, 65536);
        assert_eq!(n.params.max_burst, 1 << 20);
        assert!(!n.params.initial_r2t);
        assert_eq!(n.cmdsn, 5);
        assert_eq!(n.session_type, SessionType::Normal);
    }

    #[test]
    fn errors() {
        let c = cfg(None);
        let cases = [
            ("SessionType=Normal|", MISSING_PARAMETER),
            ("InitiatorName=i|", MISSING_PARAMETER),
            ("InitiatorName=i|TargetName=iqn.other|", NOT_FOUND),
            (
                "InitiatorName=i|SessionType=Weird|",
                SESSION_TYPE_UNSUPPORTED,
            ),
            (
                "InitiatorName=i|SessionType=Discovery|AuthMethod=CHAP|",
                AUTH_FAILED,
            ),
            ("garbage", INITIATOR_ERROR),
        ];
        for (text, want) in cases {
            let mut l = Login::new(&c);
            let Step::Fail(r) = l.step(&req(0, 1, true, text), &mut rng()) else {
                panic!("{text}")
            };
            assert_eq!(status(&r), want, "{text}");
        }
        let mut l = Login::new(&c);
        let mut r = req(0, 1, true, "InitiatorName=i|SessionType=Discovery|");
        r.version_min = 1;
        assert!(
            matches!(l.step(&r, &mut rng()), Step::Fail(p) if status(&p) == UNSUPPORTED_VERSION)
        );
        let mut l = Login::new(&c);
        let r = req(0, 2, true, "InitiatorName=i|SessionType=Discovery|");
        assert!(
            matches!(l.step(&r, &mut rng()), Step::Fail(p) if status(&p) == INVALID_DURING_LOGIN)
        );
    }

    fn chap_cfg(mutual: bool) -> ChapConfig {
        ChapConfig {
            initiator: Credential {
                user: "alice".into(),
                secret: b"alice-secret-12".to_vec(),
            },
            mutual: mutual.then(|| Credential {
                user: "target".into(),
                secret: b"target-secret-12".to_vec(),
            }),
        }
    }

    /// Runs CHAP up to the challenge; returns (login, id, challenge).
    fn challenge<'a>(c: &'a TargetConfig) -> (Login<'a>, u8, Vec<u8>) {
        let mut l = Login::new(c);
        let text = format!("InitiatorName=i|TargetName={TARGET}|AuthMethod=CHAP,None|");
        let Step::Continue(r) = l.step(&req(0, 1, true, &text), &mut rng()) else {
            panic!()
        };
        assert_eq!(r.bhs[1] & 0x80, 0, "no transit before CHAP is done");
        assert!(pairs(&r).contains(&("AuthMethod".into(), "CHAP".into())));
        let Step::Continue(r) = l.step(&req(0, 1, false, "CHAP_A=7,5|"), &mut rng()) else {
            panic!()
        };
        let p = pairs(&r);
        let get = |k: &str| p.iter().find(|(pk, _)| pk == k).unwrap().1.clone();
        assert_eq!(get("CHAP_A"), "5");
        let id: u8 = get("CHAP_I").parse().unwrap();
        let ch = chap::decode_binary(&get("CHAP_C"), 64).unwrap();
        assert_eq!(ch.len(), CHALLENGE_LEN);
        (l, id, ch)
    }

    #[test]
    fn chap_one_way() {
        let c = cfg(Some(chap_cfg(false)));
        let (mut l, id, ch) = challenge(&c);
        let r = chap::encode_hex(&chap::response(id, b"alice-secret-12", &ch));
        let text = format!("CHAP_N=alice|CHAP_R={r}|");
        let Step::Continue(resp) = l.step(&req(0, 1, true, &text), &mut rng()) else {
            panic!()
        };
        assert_eq!(resp.bhs[1], 0x80 | 0x01);
        assert!(matches!(
            l.step(
                &req(1, 3, true, "MaxRecvDataSegmentLength=8192|"),
                &mut rng()
            ),
            Step::Done(..)
        ));
    }

    #[test]
    fn chap_wrong_secret_or_user_or_skipping() {
        let c = cfg(Some(chap_cfg(false)));
        for (user, secret) in [
            ("alice", &b"wrong-secret-12"[..]),
            ("bob", b"alice-secret-12"),
        ] {
            let (mut l, id, ch) = challenge(&c);
            let r = chap::encode_hex(&chap::response(id, secret, &ch));
            let text = format!("CHAP_N={user}|CHAP_R={r}|");
            let Step::Fail(p) = l.step(&req(0, 1, true, &text), &mut rng()) else {
                panic!()
            };
            assert_eq!(status(&p), AUTH_FAILED);
        }
        // Straight to the operational stage without authenticating.
        let mut l = Login::new(&c);
        let text = format!("InitiatorName=i|TargetName={TARGET}|");
        let Step::Fail(p) = l.step(&req(1, 3, true, &text), &mut rng()) else {
            panic!()
        };
        assert_eq!(status(&p), AUTH_FAILED);
        // Offering only None.
        let mut l = Login::new(&c);
        let text = format!("InitiatorName=i|TargetName={TARGET}|AuthMethod=None|");
        assert!(matches!(
            l.step(&req(0, 1, true, &text), &mut rng()),
            Step::Fail(_)
        ));
    }

    #[test]
    fn chap_mutual() {
        let c = cfg(Some(chap_cfg(true)));
        let (mut l, id, ch) = challenge(&c);
        let r = chap::encode_hex(&chap::response(id, b"alice-secret-12", &ch));
        let my_ch = [9u8; 16];
        let text = format!(
            "CHAP_N=alice|CHAP_R={r}|CHAP_I=77|CHAP_C={}|",
            chap::encode_hex(&my_ch)
        );
        let Step::Continue(resp) = l.step(&req(0, 1, true, &text), &mut rng()) else {
            panic!()
        };
        let p = pairs(&resp);
        assert!(p.contains(&("CHAP_N".into(), "target".into())));
        let want = chap::encode_hex(&chap::response(77, b"target-secret-12", &my_ch));
        assert!(p.contains(&("CHAP_R".into(), want)));

        // Reflection of the target's own challenge is refused.
        let (mut l, id, ch) = challenge(&c);
        let r = chap::encode_hex(&chap::response(id, b"alice-secret-12", &ch));
        let text = format!(
            "CHAP_N=alice|CHAP_R={r}|CHAP_I=1|CHAP_C={}|",
            chap::encode_hex(&ch)
        );
        assert!(matches!(
            l.step(&req(0, 1, true, &text), &mut rng()),
            Step::Fail(_)
        ));
    }

    #[test]
    fn continued_text() {
        let c = cfg(None);
        let mut l = Login::new(&c);
        let mut first = req(0, 1, false, "InitiatorName=i|SessionTy");
        first.continue_ = true;
        assert!(matches!(l.step(&first, &mut rng()), Step::Continue(r) if r.data.is_empty()));
        let Step::Continue(r) = l.step(
            &req(0, 1, true, "pe=Discovery|AuthMethod=None|"),
            &mut rng(),
        ) else {
            panic!()
        };
        assert_eq!(status(&r), SUCCESS);
        let Step::Done(_, n) = l.step(&req(1, 3, true, ""), &mut rng()) else {
            panic!()
        };
        assert_eq!(n.session_type, SessionType::Discovery);
    }
}
