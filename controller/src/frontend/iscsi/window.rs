//! The command window of a session (RFC 7143 §4.2.2.1): ExpCmdSN,
//! MaxCmdSN, and which commands are admitted.
//!
//! A non-immediate PDU (SCSI command, NOP-Out with a reply, task
//! management, text, logout) consumes one CmdSN and must carry a CmdSN in
//! `[ExpCmdSN, MaxCmdSN]`; outside it is silently ignored. Immediate PDUs
//! carry the current CmdSN but do not consume it and are always admitted.
//! MaxCmdSN = ExpCmdSN + size - 1 - (admitted commands not yet answered),
//! so the window shrinks while commands run and reopens as they finish;
//! it never moves backwards. Getting this wrong for non-immediate NOP-Outs
//! is what makes gotgt hang libiscsi clients.

/// `a <= b` in 32-bit serial number arithmetic (RFC 1982).
pub fn sn_le(a: u32, b: u32) -> bool {
    b.wrapping_sub(a) < 1 << 31
}

/// What to do with a PDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Run it; it holds a slot until [`Window::done`] is called.
    Slot,
    /// Immediate: run it without a slot.
    Immediate,
    /// Outside the window: ignore it silently.
    Ignore,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    exp: u32,
    size: u32,
    busy: u32,
}

impl Window {
    /// A window whose first expected CmdSN is `first`.
    pub fn new(first: u32, size: u32) -> Window {
        Window {
            exp: first,
            size: size.max(1),
            busy: 0,
        }
    }

    pub fn exp_cmdsn(&self) -> u32 {
        self.exp
    }

    pub fn max_cmdsn(&self) -> u32 {
        self.exp
            .wrapping_add(self.size - self.busy.min(self.size))
            .wrapping_sub(1)
    }

    /// Decides about a PDU carrying `cmdsn`. A non-immediate PDU in the
    /// window advances ExpCmdSN past it (on one connection PDUs arrive in
    /// order; a gap means the initiator skipped numbers, which are then
    /// treated as used).
    pub fn admit(&mut self, cmdsn: u32, immediate: bool) -> Admit {
        if immediate {
            return Admit::Immediate;
        }
        if !(sn_le(self.exp, cmdsn) && sn_le(cmdsn, self.max_cmdsn())) {
            return Admit::Ignore;
        }
        self.exp = cmdsn.wrapping_add(1);
        self.busy += 1;
        Admit::Slot
    }

    /// An admitted command got its answer (or was aborted).
    pub fn done(&mut self) {
        self.busy = self.busy.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_arithmetic() {
        assert!(sn_le(1, 1) && sn_le(1, 2) && !sn_le(2, 1));
        assert!(sn_le(u32::MAX, 0) && !sn_le(0, u32::MAX));
    }

    #[test]
    fn window_moves_and_never_shrinks_backwards() {
        let mut w = Window::new(10, 4);
        assert_eq!((w.exp_cmdsn(), w.max_cmdsn()), (10, 13));
        assert_eq!(w.admit(9, false), Admit::Ignore, "too low");
        assert_eq!(w.admit(14, false), Admit::Ignore, "too high");
        assert_eq!(w.admit(10, false), Admit::Slot);
        assert_eq!((w.exp_cmdsn(), w.max_cmdsn()), (11, 13));
        // Immediate PDUs (NOP-Out pings, TMFs) neither need nor take a slot.
        assert_eq!(w.admit(11, true), Admit::Immediate);
        assert_eq!((w.exp_cmdsn(), w.max_cmdsn()), (11, 13));
        for sn in 11..14 {
            assert_eq!(w.admit(sn, false), Admit::Slot);
        }
        assert_eq!((w.exp_cmdsn(), w.max_cmdsn()), (14, 13), "window closed");
        assert_eq!(w.admit(14, false), Admit::Ignore);
        w.done();
        assert_eq!(w.max_cmdsn(), 14);
        assert_eq!(w.admit(14, false), Admit::Slot);
    }

    #[test]
    fn non_immediate_nops_are_counted() {
        // A stream of non-immediate NOP-Outs, each answered before the
        // next: the window must keep moving (the gotgt bug stalls here).
        let mut w = Window::new(0, 2);
        for sn in 0..1000u32 {
            assert_eq!(w.admit(sn, false), Admit::Slot, "cmdsn {sn}");
            w.done();
            assert_eq!(w.exp_cmdsn(), sn + 1);
            assert_eq!(w.max_cmdsn(), sn + 2);
        }
    }

    #[test]
    fn wraps() {
        let mut w = Window::new(u32::MAX, 8);
        assert_eq!(w.admit(u32::MAX, false), Admit::Slot);
        assert_eq!(w.admit(0, false), Admit::Slot);
        assert_eq!(w.exp_cmdsn(), 1);
        assert_eq!(w.max_cmdsn(), 6);
    }
}
