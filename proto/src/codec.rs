//! prost's gRPC codec, except that a request which does not decode (a string field that is not
//! UTF-8, a truncated message) is the client's mistake: INVALID_ARGUMENT, not INTERNAL.

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

pub struct ClientErrorCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for ClientErrorCodec<T, U> {
    fn default() -> Self {
        ClientErrorCodec(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for ClientErrorCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ClientErrorDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ClientErrorDecoder(self.0.decoder())
    }
}

pub struct ClientErrorDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for ClientErrorDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| match status.code() {
            Code::Internal => Status::invalid_argument(format!(
                "the message does not decode: {}",
                status.message()
            )),
            _ => status,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
