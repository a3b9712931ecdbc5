//! Connect's streaming envelopes, for tests that speak the protocol by
//! hand: a flag byte (0x02 ends the stream), a big-endian length, the
//! message.

/// `payload` as one request envelope.
pub fn envelope(payload: &[u8]) -> Vec<u8> {
    let mut envelope = vec![0u8];
    envelope.extend_from_slice(&u32::try_from(payload.len()).expect("a message under 4 GiB").to_be_bytes());
    envelope.extend_from_slice(payload);
    envelope
}

/// One whole envelope of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Message(Vec<u8>),
    /// The end of the stream (its JSON says whether it failed).
    End(Vec<u8>),
}

/// Splits a response into envelopes as its chunks arrive.
#[derive(Debug, Default)]
pub struct Envelopes {
    buffer: Vec<u8>,
}

impl Envelopes {
    /// The envelopes `chunk` completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Frame> {
        self.buffer.extend_from_slice(chunk);
        let mut frames = Vec::new();
        while self.buffer.len() >= 5 {
            let length = u32::from_be_bytes([self.buffer[1], self.buffer[2], self.buffer[3], self.buffer[4]]) as usize;
            if self.buffer.len() < 5 + length {
                break;
            }
            let message = self.buffer[5..5 + length].to_vec();
            frames.push(if self.buffer[0] & 0x02 != 0 { Frame::End(message) } else { Frame::Message(message) });
            self.buffer.drain(..5 + length);
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_split_across_chunks_come_out_whole() {
        let mut stream = envelope(b"{\"a\":1}");
        let mut end = envelope(b"{}");
        end[0] = 0x02;
        stream.extend_from_slice(&end);
        let mut envelopes = Envelopes::default();
        assert_eq!(envelopes.push(&stream[..3]), []);
        assert_eq!(envelopes.push(&stream[3..14]), [Frame::Message(b"{\"a\":1}".to_vec())]);
        assert_eq!(envelopes.push(&stream[14..]), [Frame::End(b"{}".to_vec())]);
    }
}
