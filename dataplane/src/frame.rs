//! A received frame inside a larger buffer, with headroom in front so headers
//! can be pushed (VXLAN encapsulation, ICMP error construction) without a
//! copy of the payload, like `bpf_xdp_adjust_head`.

/// Not enough headroom or tailroom for the requested change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoRoom;

/// `buf[start..end]` is the frame; `buf[..start]` is headroom.
pub struct Frame<'a> {
    buf: &'a mut [u8],
    start: usize,
    end: usize,
}

impl<'a> Frame<'a> {
    /// A frame of `len` bytes at `headroom` in `buf`.
    ///
    /// # Panics
    /// When `headroom + len` exceeds the buffer: a runtime bug, not input.
    pub fn new(buf: &'a mut [u8], headroom: usize, len: usize) -> Self {
        assert!(headroom + len <= buf.len(), "frame outside its buffer");
        Frame {
            buf,
            start: headroom,
            end: headroom + len,
        }
    }

    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Offset of the frame in its buffer (the runtime's new headroom).
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Grows the frame at the front by `n` bytes (contents unspecified).
    pub fn push_front(&mut self, n: usize) -> Result<(), NoRoom> {
        if n > self.start {
            return Err(NoRoom);
        }
        self.start -= n;
        Ok(())
    }

    /// Drops `n` bytes from the front.
    pub fn pull_front(&mut self, n: usize) -> Result<(), NoRoom> {
        if n > self.len() {
            return Err(NoRoom);
        }
        self.start += n;
        Ok(())
    }

    /// Shortens the frame to `len` bytes; never grows it.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.end = self.start + len;
        }
    }

    /// Changes the length to `len` (growing into tailroom if needed).
    pub fn set_len(&mut self, len: usize) -> Result<(), NoRoom> {
        if self.start + len > self.buf.len() {
            return Err(NoRoom);
        }
        self.end = self.start + len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_pull_and_truncate() {
        let mut buf = [0u8; 32];
        buf[8..12].copy_from_slice(&[1, 2, 3, 4]);
        let mut f = Frame::new(&mut buf, 8, 4);
        assert_eq!(f.data(), &[1, 2, 3, 4]);
        f.push_front(2).unwrap();
        assert_eq!(f.len(), 6);
        assert_eq!(f.push_front(7), Err(NoRoom));
        f.pull_front(3).unwrap();
        assert_eq!(f.data(), &[2, 3, 4]);
        f.truncate(1);
        assert_eq!(f.data(), &[2]);
        f.truncate(10);
        assert_eq!(f.len(), 1);
        assert_eq!(f.set_len(30), Err(NoRoom));
    }
}
