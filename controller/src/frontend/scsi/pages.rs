//! The data of the descriptive SCSI commands (INQUIRY and its VPD pages,
//! READ CAPACITY, MODE SENSE pages, REPORT LUNS, REPORT SUPPORTED
//! OPERATION CODES). Pure builders from a [`Identity`] and the limits in
//! [`Limits`]; `lun` truncates them to the allocation length.

use super::cdb::*;
use super::sense::Sense;

/// Logical block size exported over iSCSI. 4096 matches the backend's
/// alignment, so no command ever needs a read-modify-write.
pub const BLOCK: u64 = 4096;

/// The limits reported in the Block Limits VPD page and enforced by `lun`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest READ/WRITE/VERIFY in blocks.
    pub max_transfer: u32,
    /// Optimal transfer in blocks.
    pub optimal_transfer: u32,
    /// Largest UNMAP (total blocks) and descriptor count.
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    /// Largest WRITE SAME in blocks.
    pub max_write_same: u32,
    /// Largest COMPARE AND WRITE in blocks.
    pub max_compare_write: u8,
}

pub const LIMITS: Limits = Limits {
    max_transfer: 2048, // 8 MiB
    optimal_transfer: 256,
    max_unmap_blocks: 1 << 20, // 4 GiB
    max_unmap_descriptors: 64,
    max_write_same: 1 << 20,
    max_compare_write: 16,
};

/// Names that identify the logical unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The volume name.
    pub volume: String,
    /// The iSCSI target name (`iqn.2026-11.io.strata:<volume>`).
    pub target: String,
}

impl Identity {
    /// 64-bit FNV-1a of the volume name: stable across restarts.
    fn hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.volume.as_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// Unit serial number (VPD 0x80): printable ASCII.
    pub fn serial(&self) -> String {
        format!("{:016x}", self.hash())
    }

    /// NAA designator, type 3 (locally assigned), 8 bytes.
    pub fn naa(&self) -> [u8; 8] {
        let v = (3u64 << 60) | (self.hash() >> 4);
        v.to_be_bytes()
    }
}

fn pad_ascii(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .filter(|b| b.is_ascii_graphic() || *b == b' ')
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

/// Standard INQUIRY data (SPC-4 §6.6.2). `present` is false for a LUN
/// that does not exist (peripheral qualifier 3, type 0x1f).
pub fn standard_inquiry(present: bool) -> Vec<u8> {
    let mut b = vec![0u8; 74];
    b[0] = if present { 0x00 } else { 0x7f };
    b[2] = 0x06; // SPC-4
    b[3] = 0x12; // HISUP, response data format 2
    b[4] = (b.len() - 5) as u8;
    b[7] = 0x02; // CMDQUE
    b[8..16].copy_from_slice(&pad_ascii("STRATA", 8));
    b[16..32].copy_from_slice(&pad_ascii("strata volume", 16));
    b[32..36].copy_from_slice(&pad_ascii("0001", 4));
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        b[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    b
}

/// VPD pages supported, in order.
pub const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

fn vpd(page: u8, body: Vec<u8>) -> Vec<u8> {
    let mut b = vec![0x00, page];
    b.extend_from_slice(&(body.len() as u16).to_be_bytes());
    b.extend_from_slice(&body);
    b
}

fn designator(code_set: u8, assoc_type: u8, data: &[u8]) -> Vec<u8> {
    let mut d = vec![code_set, assoc_type, 0, data.len() as u8];
    d.extend_from_slice(data);
    d
}

/// A VPD page, or `None` for a page that is not supported.
pub fn vpd_page(page: u8, id: &Identity) -> Option<Vec<u8>> {
    Some(match page {
        0x00 => vpd(0x00, VPD_PAGES.to_vec()),
        0x80 => vpd(0x80, id.serial().into_bytes()),
        0x83 => {
            let mut body = Vec::new();
            // NAA, binary, associated with the logical unit.
            body.extend(designator(0x01, 0x03, &id.naa()));
            // T10 vendor ID, ASCII: vendor + serial.
            let mut t10 = pad_ascii("STRATA", 8);
            t10.extend_from_slice(id.serial().as_bytes());
            body.extend(designator(0x02, 0x01, &t10));
            // SCSI name string of the target port (iSCSI, PIV, UTF-8),
            // NUL-terminated and padded to a multiple of 4.
            let mut name = format!("{},t,0x0001", id.target).into_bytes();
            name.push(0);
            name.resize(name.len().div_ceil(4) * 4, 0);
            if name.len() <= 252 {
                body.extend(designator(0x53, 0x98, &name));
            }
            // Relative target port 1 (iSCSI, PIV, target port).
            body.extend(designator(0x51, 0x94, &[0, 0, 0, 1]));
            vpd(0x83, body)
        }
        0xb0 => {
            let l = LIMITS;
            let mut b = vec![0u8; 0x3c];
            // WSNZ 0: WRITE SAME with 0 blocks writes to the end of the LUN.
            b[1] = l.max_compare_write;
            b[2..4].copy_from_slice(&1u16.to_be_bytes()); // optimal granularity
            b[4..8].copy_from_slice(&l.max_transfer.to_be_bytes());
            b[8..12].copy_from_slice(&l.optimal_transfer.to_be_bytes());
            b[16..20].copy_from_slice(&l.max_unmap_blocks.to_be_bytes());
            b[20..24].copy_from_slice(&l.max_unmap_descriptors.to_be_bytes());
            // Optimal unmap granularity: not reported (0). With a value,
            // qemu 7.2 keeps an allocation map and then asks block status
            // with a length not aligned to 4096-byte blocks, and asserts.
            b[32..40].copy_from_slice(&(l.max_write_same as u64).to_be_bytes());
            vpd(0xb0, b)
        }
        0xb1 => {
            let mut b = vec![0u8; 0x3c];
            b[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating
            vpd(0xb1, b)
        }
        0xb2 => {
            // LBPU, LBPWS, LBPWS10, LBPRZ; thin provisioned.
            vpd(0xb2, vec![0x00, 0xe4, 0x02, 0x00])
        }
        _ => return None,
    })
}

/// READ CAPACITY (10): the last LBA (0xffffffff when it does not fit) and
/// the block length.
pub fn read_capacity10(blocks: u64) -> Vec<u8> {
    let last = blocks.saturating_sub(1).min(u32::MAX as u64) as u32;
    let mut b = last.to_be_bytes().to_vec();
    b.extend_from_slice(&(BLOCK as u32).to_be_bytes());
    b
}

/// READ CAPACITY (16): also logical block provisioning (LBPME, LBPRZ).
pub fn read_capacity16(blocks: u64) -> Vec<u8> {
    let mut b = vec![0u8; 32];
    b[0..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
    b[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
    b[14] = 0xc0; // LBPME | LBPRZ
    b
}

/// REPORT LUNS: one LUN, 0.
pub fn report_luns() -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[3] = 8;
    b
}

/// Mode pages kept by the logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    /// Write cache enabled (caching page WCE). When off, every write is FUA.
    pub wce: bool,
}

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0a;

fn caching_page(pc: u8, st: ModeState) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = CACHING;
    p[1] = 18;
    match pc {
        1 => p[2] = 0x04, // WCE is changeable
        2 => p[2] = 0x04, // default: write cache on
        _ => p[2] = if st.wce { 0x04 } else { 0 },
    }
    p
}

fn control_page(pc: u8) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = CONTROL;
    p[1] = 10;
    if pc != 1 {
        p[3] = 0x10; // queue algorithm modifier 1: unrestricted reordering
        p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
    }
    p
}

/// MODE SENSE (6) or (10) data, or `None` for a page (or subpage) that is
/// not supported. `pc` 3 (saved) is refused by the caller.
pub fn mode_sense(
    ten: bool,
    dbd: bool,
    pc: u8,
    page: u8,
    subpage: u8,
    blocks: u64,
    st: ModeState,
) -> Option<Vec<u8>> {
    let mut pages = Vec::new();
    match (page, subpage) {
        (CACHING, 0) => pages.extend(caching_page(pc, st)),
        (CONTROL, 0) => pages.extend(control_page(pc)),
        (0x3f, 0) | (0x3f, 0xff) => {
            pages.extend(caching_page(pc, st));
            pages.extend(control_page(pc));
        }
        _ => return None,
    }
    let mut bd = Vec::new();
    if !dbd {
        bd = vec![0u8; 8];
        let n = blocks.min(0xff_ffff) as u32;
        bd[1..4].copy_from_slice(&n.to_be_bytes()[1..]);
        bd[5..8].copy_from_slice(&(BLOCK as u32).to_be_bytes()[1..]);
    }
    let dsp = 0x10; // DPOFUA
    let mut out = Vec::new();
    if ten {
        let len = (6 + bd.len() + pages.len()) as u16;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&[0, dsp, 0, 0]);
        out.extend_from_slice(&(bd.len() as u16).to_be_bytes());
    } else {
        let len = (3 + bd.len() + pages.len()) as u8;
        out.extend_from_slice(&[len, 0, dsp, bd.len() as u8]);
    }
    out.extend(bd);
    out.extend(pages);
    Some(out)
}

/// Applies a MODE SELECT parameter list; refused with INVALID FIELD IN
/// PARAMETER LIST. Only the caching page's WCE bit may change; other pages
/// must hold the current values.
pub fn mode_select(ten: bool, list: &[u8], st: &mut ModeState) -> Result<(), Sense> {
    let bad = Sense::INVALID_FIELD_IN_PARAMETER_LIST;
    let (hdr, bdlen) = if ten {
        if list.len() < 8 {
            return Err(bad);
        }
        (8usize, u16::from_be_bytes([list[6], list[7]]) as usize)
    } else {
        if list.len() < 4 {
            return Err(bad);
        }
        (4, list[3] as usize)
    };
    let mut at = hdr.checked_add(bdlen).ok_or(bad)?;
    if at > list.len() {
        return Err(bad);
    }
    for bd in list[hdr..at].chunks(8) {
        if bd.len() != 8 || bd[5..8] != (BLOCK as u32).to_be_bytes()[1..] {
            return Err(bad); // a different block length is not supported
        }
    }
    let mut new = *st;
    while at < list.len() {
        if list.len() - at < 2 || list[at] & 0x40 != 0 {
            return Err(bad); // truncated, or a subpage format
        }
        let code = list[at] & 0x3f;
        let len = list[at + 1] as usize;
        let page = list.get(at..at + 2 + len).ok_or(bad)?;
        match code {
            CACHING if len == 18 => {
                let cur = caching_page(0, *st);
                let changed: Vec<usize> = (2..20).filter(|&i| page[i] != cur[i]).collect();
                if changed.iter().any(|&i| i != 2) || (page[2] ^ cur[2]) & !0x04 != 0 {
                    return Err(bad);
                }
                new.wce = page[2] & 0x04 != 0;
            }
            CONTROL if len == 10 => {
                if page[2..] != control_page(0)[2..] {
                    return Err(bad);
                }
            }
            _ => return Err(bad),
        }
        at += 2 + len;
    }
    *st = new;
    Ok(())
}

/// (opcode, service action, CDB length) of every supported command.
pub const SUPPORTED: &[(u8, Option<u16>, u8)] = &[
    (TEST_UNIT_READY, None, 6),
    (REQUEST_SENSE, None, 6),
    (READ_6, None, 6),
    (WRITE_6, None, 6),
    (INQUIRY, None, 6),
    (MODE_SELECT_6, None, 6),
    (MODE_SENSE_6, None, 6),
    (READ_CAPACITY_10, None, 10),
    (READ_10, None, 10),
    (WRITE_10, None, 10),
    (WRITE_VERIFY_10, None, 10),
    (VERIFY_10, None, 10),
    (SYNCHRONIZE_CACHE_10, None, 10),
    (WRITE_SAME_10, None, 10),
    (UNMAP, None, 10),
    (MODE_SELECT_10, None, 10),
    (MODE_SENSE_10, None, 10),
    (READ_16, None, 16),
    (COMPARE_AND_WRITE, None, 16),
    (WRITE_16, None, 16),
    (WRITE_VERIFY_16, None, 16),
    (VERIFY_16, None, 16),
    (SYNCHRONIZE_CACHE_16, None, 16),
    (WRITE_SAME_16, None, 16),
    (SERVICE_ACTION_IN_16, Some(SA_READ_CAPACITY_16), 16),
    (SERVICE_ACTION_IN_16, Some(SA_GET_LBA_STATUS), 16),
    (ORWRITE_16, None, 16),
    (PRE_FETCH_10, None, 10),
    (PRE_FETCH_16, None, 16),
    (REPORT_LUNS, None, 12),
    (MAINTENANCE_IN, Some(SA_REPORT_SUPPORTED_OPCODES), 12),
    (READ_12, None, 12),
    (WRITE_12, None, 12),
    (WRITE_VERIFY_12, None, 12),
    (VERIFY_12, None, 12),
];

/// The CDB usage map of a supported command: which bits of each CDB byte
/// the device server looks at.
fn usage(op: u8, sa: Option<u16>, len: u8) -> Vec<u8> {
    let mut u = vec![0xffu8; len as usize];
    u[0] = op;
    if let Some(sa) = sa {
        u[1] = 0xe0 | sa as u8;
    }
    let last = len as usize - 1;
    u[last] = 0x00; // control byte: NACA and LINK are not supported
    u
}

const TIMEOUTS: [u8; 12] = [0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// REPORT SUPPORTED OPERATION CODES data; an options value or an
/// opcode/service action mismatch is INVALID FIELD IN CDB pointing at the
/// reporting options.
pub fn report_opcodes(rctd: bool, options: u8, opcode: u8, sa: u16) -> Result<Vec<u8>, Sense> {
    let bad = Sense::INVALID_FIELD_IN_CDB.at_cdb_byte(2);
    let mut out = Vec::new();
    match options {
        0 => {
            out.extend_from_slice(&[0, 0, 0, 0]);
            for &(op, s, len) in SUPPORTED {
                out.push(op);
                out.push(0);
                out.extend_from_slice(&s.unwrap_or(0).to_be_bytes());
                out.push(0);
                out.push(if rctd { 0x02 } else { 0 } | if s.is_some() { 1 } else { 0 });
                out.extend_from_slice(&(len as u16).to_be_bytes());
                if rctd {
                    out.extend_from_slice(&TIMEOUTS);
                }
            }
            let n = (out.len() - 4) as u32;
            out[0..4].copy_from_slice(&n.to_be_bytes());
        }
        1 | 2 => {
            let has_sa = SUPPORTED
                .iter()
                .any(|&(op, s, _)| op == opcode && s.is_some());
            if (options == 1 && has_sa) || (options == 2 && !has_sa) {
                return Err(bad);
            }
            let want = (options == 2).then_some(sa);
            let found = SUPPORTED
                .iter()
                .find(|&&(op, s, _)| op == opcode && s == want);
            let ctdp = if rctd { 0x80 } else { 0 };
            match found {
                Some(&(op, s, len)) => {
                    out.extend_from_slice(&[0, ctdp | 0x03]);
                    out.extend_from_slice(&(len as u16).to_be_bytes());
                    out.extend(usage(op, s, len));
                }
                None => out.extend_from_slice(&[0, ctdp | 0x01, 0, 0]),
            }
            if rctd {
                out.extend_from_slice(&TIMEOUTS);
            }
        }
        _ => return Err(bad),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            volume: "vol".into(),
            target: "iqn.2026-11.io.strata:vol".into(),
        }
    }

    #[test]
    fn inquiry_data() {
        let b = standard_inquiry(true);
        assert_eq!(b[0], 0);
        assert_eq!(b[4] as usize + 5, b.len());
        assert_eq!(&b[8..16], b"STRATA  ");
        assert_eq!(standard_inquiry(false)[0], 0x7f);
        let p0 = vpd_page(0, &id()).unwrap();
        assert_eq!(&p0[..4], &[0, 0, 0, 6]);
        assert_eq!(&p0[4..], &VPD_PAGES);
        for p in VPD_PAGES {
            let v = vpd_page(p, &id()).unwrap();
            assert_eq!(v[1], p);
            assert_eq!(u16::from_be_bytes([v[2], v[3]]) as usize + 4, v.len());
        }
        assert!(vpd_page(0x86, &id()).is_none());
        let b0 = vpd_page(0xb0, &id()).unwrap();
        assert_eq!(u32::from_be_bytes(b0[8..12].try_into().unwrap()), 2048);
        assert_eq!(id().naa()[0] >> 4, 3);
        assert_eq!(id().serial(), id().serial());
    }

    #[test]
    fn capacity_data() {
        assert_eq!(read_capacity10(256), vec![0, 0, 0, 255, 0, 0, 0x10, 0]);
        assert_eq!(&read_capacity10(1 << 40)[..4], &[0xff; 4]);
        let c = read_capacity16(1 << 40);
        assert_eq!(
            u64::from_be_bytes(c[..8].try_into().unwrap()),
            (1 << 40) - 1
        );
        assert_eq!(c[14], 0xc0);
    }

    #[test]
    fn mode_pages() {
        let st = ModeState { wce: true };
        let all = mode_sense(false, false, 0, 0x3f, 0, 100, st).unwrap();
        assert_eq!(all[0] as usize + 1, all.len());
        assert_eq!(all[3], 8);
        assert_eq!(all[4 + 8], CACHING);
        assert_eq!(all[4 + 8 + 2] & 0x04, 0x04);
        let ten = mode_sense(true, true, 0, CONTROL, 0, 100, st).unwrap();
        assert_eq!(u16::from_be_bytes([ten[0], ten[1]]) as usize + 2, ten.len());
        assert_eq!(ten[8], CONTROL);
        assert!(mode_sense(false, true, 0, 0x19, 0, 100, st).is_none());
        assert!(mode_sense(false, true, 0, CACHING, 1, 100, st).is_none());
    }

    #[test]
    fn mode_select_wce() {
        let mut st = ModeState { wce: true };
        let mut list = vec![0, 0, 0, 0];
        let mut page = caching_page(0, st);
        page[2] = 0;
        list.extend(&page);
        mode_select(false, &list, &mut st).unwrap();
        assert!(!st.wce);
        let mut bad = list.clone();
        bad[4 + 3] = 1;
        assert!(mode_select(false, &bad, &mut st).is_err());
        assert!(mode_select(false, &list[..10], &mut st).is_err());
        let mut ctl = vec![0, 0, 0, 0];
        ctl.extend(control_page(0));
        mode_select(false, &ctl, &mut st).unwrap();
        ctl[4 + 2] = 0x04; // D_SENSE
        assert!(mode_select(false, &ctl, &mut st).is_err());
    }

    #[test]
    fn opcodes() {
        let all = report_opcodes(false, 0, 0, 0).unwrap();
        assert_eq!(all.len(), 4 + 8 * SUPPORTED.len());
        let one = report_opcodes(false, 1, READ_10, 0).unwrap();
        assert_eq!(&one[..4], &[0, 3, 0, 10]);
        assert_eq!(one[4], READ_10);
        assert_eq!(report_opcodes(false, 1, 0x1b, 0).unwrap()[1], 1);
        assert!(report_opcodes(false, 1, SERVICE_ACTION_IN_16, 0).is_err());
        let rc16 = report_opcodes(true, 2, SERVICE_ACTION_IN_16, 0x10).unwrap();
        assert_eq!(rc16[1], 0x83);
        assert_eq!(rc16.len(), 4 + 16 + 12);
        assert!(report_opcodes(false, 5, 0, 0).is_err());
    }
}
