//! Reading a client frame into a [`Request`] in one pass over its text.
//!
//! serde's internally tagged enums buffer the whole object before they look
//! at the tag, and take a number for a variant's index (`{"action":5}` would
//! run the sixth command). This reads the fields in order instead: those
//! before `action` (clients send it first, so usually none) are kept as
//! borrowed raw JSON, then the command's struct reads the rest straight from
//! the frame, with `requestId` taken out wherever it stands.

use std::borrow::Cow;
use std::fmt;

use serde::de::value::{CowStrDeserializer, MapAccessDeserializer};
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Action, Command, Request, RequestId};

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RequestVisitor)
    }
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = Request;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with an action")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Request, A::Error> {
        let mut request_id = None;
        let mut before = Vec::new();
        let action = loop {
            let Some(Text(key)) = map.next_key()? else {
                return Err(de::Error::missing_field("action"));
            };
            match &*key {
                "action" => break map.next_value::<Text>()?.0,
                "requestId" => request_id = map.next_value()?,
                _ => before.push((key, map.next_value::<&'de RawValue>()?)),
            }
        };
        let Some(action) = Action::from_name(&action) else {
            return Err(de::Error::custom("unknown action"));
        };
        let mut fields =
            Fields { before: before.into_iter(), pending: None, map, request_id: &mut request_id };
        let command = read_command(action, MapAccessDeserializer::new(&mut fields))?;
        Ok(Request { request_id, command })
    }
}

fn read_command<'de, D: Deserializer<'de>>(action: Action, fields: D) -> Result<Command, D::Error> {
    Ok(match action {
        Action::CreateChat => Command::CreateChat(Deserialize::deserialize(fields)?),
        Action::SendMessage => Command::SendMessage(Deserialize::deserialize(fields)?),
        Action::CreateAttachment => Command::CreateAttachment(Deserialize::deserialize(fields)?),
        Action::GetAttachment => Command::GetAttachment(Deserialize::deserialize(fields)?),
        Action::ModifyChatParticipants => Command::ModifyChatParticipants(Deserialize::deserialize(fields)?),
        Action::ListChats => Command::ListChats(Deserialize::deserialize(fields)?),
        Action::Sync => Command::Sync(Deserialize::deserialize(fields)?),
        Action::Ack => Command::Ack(Deserialize::deserialize(fields)?),
        Action::RemoveDevice => Command::RemoveDevice(Deserialize::deserialize(fields)?),
        Action::UploadKeys => Command::UploadKeys(Deserialize::deserialize(fields)?),
        Action::GetKeys => Command::GetKeys(Deserialize::deserialize(fields)?),
        Action::ListDevices => Command::ListDevices(Deserialize::deserialize(fields)?),
        Action::SendToDevices => Command::SendToDevices(Deserialize::deserialize(fields)?),
        Action::MarkRead => Command::MarkRead(Deserialize::deserialize(fields)?),
        Action::GetReceipts => Command::GetReceipts(Deserialize::deserialize(fields)?),
        Action::Typing => Command::Typing(Deserialize::deserialize(fields)?),
        Action::DeleteAccount => Command::DeleteAccount(Deserialize::deserialize(fields)?),
    })
}

/// The command's fields: first those read before the action, then the rest
/// of the frame, less `requestId`.
struct Fields<'de, 'r, A> {
    before: std::vec::IntoIter<(Cow<'de, str>, &'de RawValue)>,
    /// The value of a key handed out from `before`.
    pending: Option<&'de RawValue>,
    map: A,
    request_id: &'r mut Option<RequestId>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for &mut Fields<'de, '_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        if let Some((key, value)) = self.before.next() {
            self.pending = Some(value);
            return seed.deserialize(CowStrDeserializer::new(key)).map(Some);
        }
        loop {
            match self.map.next_key::<Text>()? {
                None => return Ok(None),
                Some(Text(key)) if key == "requestId" => *self.request_id = self.map.next_value()?,
                Some(Text(key)) if key == "action" => return Err(de::Error::duplicate_field("action")),
                Some(Text(key)) => return seed.deserialize(CowStrDeserializer::new(key)).map(Some),
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        match self.pending.take() {
            Some(raw) => seed.deserialize(raw).map_err(de::Error::custom),
            None => self.map.next_value_seed(seed),
        }
    }
}

/// A string borrowed from the frame where it has no escapes, owned where it has.
struct Text<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(s.to_owned())))
            }
        }
        deserializer.deserialize_str(TextVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(frame: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(frame)
    }

    #[test]
    fn fields_before_and_after_the_action_reach_the_command() {
        let r = read(r#"{"limit":7,"requestId":"r","action":"sync","cursor":"c"}"#).unwrap();
        assert_eq!(r.request_id, Some(RequestId::try_from("r".to_owned()).unwrap()));
        match r.command {
            Command::Sync(s) => assert_eq!((s.limit, s.cursor.as_deref()), (Some(7), Some("c"))),
            other => panic!("{other:?}"),
        }
        let r =
            read(r#"{"action":"ack","messageIds":["a","b"],"requestId":"late","extra":{"x":[1]}}"#).unwrap();
        assert_eq!(r.request_id.map(String::from).as_deref(), Some("late"));
        assert!(
            matches!(r.command, Command::Ack(ref a) if a.message_ids.as_ref().is_some_and(|ids| ids.len() == 2))
        );
        let escaped = read(r#"{"act\u0069on":"listChats"}"#).unwrap();
        assert_eq!(escaped.command.action(), Action::ListChats);
    }

    #[test]
    fn an_action_is_a_known_name_and_nothing_else() {
        for frame in [
            r#"{"action":5}"#,
            r#"{"action":["sync"]}"#,
            r#"{"action":null}"#,
            r#"{"action":"SYNC"}"#,
            r#"{"requestId":"r"}"#,
            r#"{"action":"sync","action":"ack"}"#,
            r#"["sync"]"#,
        ] {
            assert!(read(frame).is_err(), "{frame}");
        }
    }

    #[test]
    fn a_field_of_the_wrong_type_is_an_error_wherever_it_stands() {
        assert!(read(r#"{"limit":"x","action":"sync"}"#).is_err());
        assert!(read(r#"{"action":"sync","limit":"x"}"#).is_err());
        assert!(read(r#"{"action":"sync","requestId":7}"#).is_err());
    }
}
