use std::io::Read;
use std::io::Result as IoResult;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::sync::mpsc::{Receiver, Sender};

/// A `Reader` that reads exactly the number of bytes from a sub-reader.
///
/// If the limit is reached, it returns EOF. If the limit is not reached
/// when the destructor is called, the remaining bytes will be read and
/// thrown away.
pub struct EqualReader<R>
where
    R: Read,
{
    reader: R,
    size: usize,
    last_read_signal: Sender<IoResult<()>>,
    // caf-worker patch: set when the body could not be drained, so the
    // connection stops instead of parsing body bytes as the next request.
    poison: Option<Arc<AtomicBool>>,
}

impl<R> EqualReader<R>
where
    R: Read,
{
    pub fn new(reader: R, size: usize) -> (EqualReader<R>, Receiver<IoResult<()>>) {
        let (tx, rx) = channel();

        let r = EqualReader {
            reader,
            size,
            last_read_signal: tx,
            poison: None,
        };

        (r, rx)
    }

    /// caf-worker patch: like `new`, and sets `poison` if the unread rest of
    /// the body cannot be drained (read error, or more than the drain limit).
    pub fn with_poison(reader: R, size: usize, poison: Arc<AtomicBool>) -> EqualReader<R> {
        let (mut r, _) = EqualReader::new(reader, size);
        r.poison = Some(poison);
        r
    }

    fn give_up(&self, e: std::io::Error) {
        if let Some(p) = &self.poison {
            p.store(true, Ordering::Release);
        }
        self.last_read_signal.send(Err(e)).ok();
    }
}

impl<R> Read for EqualReader<R>
where
    R: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        if self.size == 0 {
            return Ok(0);
        }

        let buf = if buf.len() < self.size {
            buf
        } else {
            &mut buf[..self.size]
        };

        match self.reader.read(buf) {
            Ok(len) => {
                self.size -= len;
                Ok(len)
            }
            err @ Err(_) => err,
        }
    }
}

impl<R> Drop for EqualReader<R>
where
    R: Read,
{
    fn drop(&mut self) {
        // caf-worker patch: drain through a fixed buffer (upstream allocated
        // the whole remaining Content-Length at once, so one request declaring
        // a huge length aborted the process), and give up after DRAIN_LIMIT
        // bytes or on a read error; `poison` then makes the connection close
        // rather than parse body bytes as the next request.
        const DRAIN_LIMIT: usize = 16 << 20;
        let mut remaining_to_read = self.size;
        let mut drained = 0usize;
        let mut buf = [0u8; 4096];

        while remaining_to_read > 0 {
            if drained >= DRAIN_LIMIT {
                let e = std::io::Error::new(std::io::ErrorKind::Other, "request body too large to drain");
                self.give_up(e);
                break;
            }
            let want = remaining_to_read.min(buf.len());

            match self.reader.read(&mut buf[..want]) {
                Err(e) => {
                    self.give_up(e);
                    break;
                }
                Ok(0) => {
                    // EOF before the declared length: nothing more can follow.
                    self.give_up(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "body ended early"));
                    break;
                }
                Ok(other) => {
                    remaining_to_read -= other;
                    drained += other;
                }
            }
        }
    }
}

/// caf-worker patch: wraps a body reader whose length is not known up front
/// (chunked). On drop, drains what the handler left unread, up to 16 MiB; if
/// the end of the body is not reached, sets `poison` so the connection ends
/// instead of parsing body bytes as the next request.
pub struct DrainOnDrop<R: Read> {
    reader: R,
    finished: bool,
    // A decode error means the framing is lost: never resynchronise on it.
    failed: bool,
    poison: Arc<AtomicBool>,
}

impl<R: Read> DrainOnDrop<R> {
    pub fn new(reader: R, poison: Arc<AtomicBool>) -> DrainOnDrop<R> {
        DrainOnDrop {
            reader,
            finished: false,
            failed: false,
            poison,
        }
    }
}

impl<R: Read> Read for DrainOnDrop<R> {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        if self.failed {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "chunked body is broken"));
        }
        let n = match self.reader.read(buf) {
            Ok(n) => n,
            Err(e) => {
                self.failed = true;
                return Err(e);
            }
        };
        if n == 0 && !buf.is_empty() {
            self.finished = true;
        }
        Ok(n)
    }
}

impl<R: Read> Drop for DrainOnDrop<R> {
    fn drop(&mut self) {
        const DRAIN_LIMIT: usize = 16 << 20;
        let mut buf = [0u8; 4096];
        let mut drained = 0usize;
        while !self.finished && !self.failed && drained < DRAIN_LIMIT {
            match self.reader.read(&mut buf) {
                Ok(0) => self.finished = true,
                Ok(n) => drained += n,
                Err(_) => break,
            }
        }
        if !self.finished {
            self.poison.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EqualReader;
    use std::io::Read;

    #[test]
    fn test_limit() {
        use std::io::Cursor;

        let mut org_reader = Cursor::new("hello world".to_string().into_bytes());

        {
            let (mut equal_reader, _) = EqualReader::new(org_reader.by_ref(), 5);

            let mut string = String::new();
            equal_reader.read_to_string(&mut string).unwrap();
            assert_eq!(string, "hello");
        }

        let mut string = String::new();
        org_reader.read_to_string(&mut string).unwrap();
        assert_eq!(string, " world");
    }

    #[test]
    fn test_not_enough() {
        use std::io::Cursor;

        let mut org_reader = Cursor::new("hello world".to_string().into_bytes());

        {
            let (mut equal_reader, _) = EqualReader::new(org_reader.by_ref(), 5);

            let mut vec = [0];
            equal_reader.read_exact(&mut vec).unwrap();
            assert_eq!(vec[0], b'h');
        }

        let mut string = String::new();
        org_reader.read_to_string(&mut string).unwrap();
        assert_eq!(string, " world");
    }
}
