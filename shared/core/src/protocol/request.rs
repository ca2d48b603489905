//! Reading a client frame into a [`Request`] (any command) or a
//! [`RouteRequest`] (one route's command) in one pass over its text.
//!
//! serde's internally tagged enums buffer the whole object before they look
//! at the tag, and take a number for a variant's index (`{"action":5}` would
//! run the sixth command). This reads the fields in order instead: those
//! before `action` (clients send it first, so usually none) are kept as
//! borrowed raw JSON, then the command's struct reads the rest straight from
//! the frame, with `requestId` taken out wherever it stands.
//!
//! A [`RouteRequest`] names only its own command's struct, so a route's
//! binary links that command's deserializer and no other: a frame for
//! another action stops at its `action`.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::value::{CowStrDeserializer, MapAccessDeserializer};
use serde::de::{self, Deserialize, DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Action, Command, Request, RequestId};

/// A command that has a route of its own: the struct its action's frames
/// are read into.
pub trait RouteCommand: for<'de> Deserialize<'de> {
    const ACTION: Action;
}

macro_rules! route_commands {
    ($($command:ident),* $(,)?) => {$(
        impl RouteCommand for super::$command {
            const ACTION: Action = Action::$command;
        }
    )*};
}

route_commands!(
    CreateChat,
    SendMessage,
    CreateAttachment,
    GetAttachment,
    ModifyChatParticipants,
    ListChats,
    Sync,
    Ack,
    RemoveDevice,
    UploadKeys,
    GetKeys,
    ListDevices,
    SendToDevices,
    MarkRead,
    GetReceipts,
    Typing,
    DeleteAccount,
    RegisterPush,
    UnregisterPush,
);

/// A frame for the route of `C`: a frame whose action is another's does
/// not read as one (and its fields are not looked at).
#[derive(Debug)]
pub struct RouteRequest<C> {
    pub request_id: Option<RequestId>,
    pub command: C,
}

impl<'de> Deserialize<'de> for Request {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (request_id, command) = deserializer.deserialize_map(RequestVisitor::<Command>(PhantomData))?;
        Ok(Request { request_id, command })
    }
}

impl<'de, C: RouteCommand> Deserialize<'de> for RouteRequest<C> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (request_id, command) = deserializer.deserialize_map(RequestVisitor::<Only<C>>(PhantomData))?;
        Ok(RouteRequest { request_id, command: command.0 })
    }
}

/// What a frame's fields are read into once its action is known: any
/// command ([`Command`]) or one route's ([`Only`]).
trait Commands: Sized {
    /// The action a frame names, if this reads its command.
    fn action(name: &str) -> Option<Action>;

    fn read<'de, D: Deserializer<'de>>(action: Action, fields: D) -> Result<Self, D::Error>;
}

impl Commands for Command {
    fn action(name: &str) -> Option<Action> {
        Action::from_name(name)
    }

    fn read<'de, D: Deserializer<'de>>(action: Action, fields: D) -> Result<Self, D::Error> {
        read_command(action, fields)
    }
}

/// The command of one route, and no other.
struct Only<C>(C);

impl<C: RouteCommand> Commands for Only<C> {
    fn action(name: &str) -> Option<Action> {
        (name == C::ACTION.name()).then_some(C::ACTION)
    }

    fn read<'de, D: Deserializer<'de>>(_: Action, fields: D) -> Result<Self, D::Error> {
        C::deserialize(fields).map(Only)
    }
}

struct RequestVisitor<T>(PhantomData<T>);

impl<'de, T: Commands> Visitor<'de> for RequestVisitor<T> {
    type Value = (Option<RequestId>, T);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with an action")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
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
        let Some(action) = T::action(&action) else {
            return Err(de::Error::custom("unknown action"));
        };
        let mut fields =
            Fields { before: before.into_iter(), pending: None, map, request_id: &mut request_id };
        let command = T::read(action, MapAccessDeserializer::new(&mut fields))?;
        Ok((request_id, command))
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
        Action::RegisterPush => Command::RegisterPush(Deserialize::deserialize(fields)?),
        Action::UnregisterPush => Command::UnregisterPush(Deserialize::deserialize(fields)?),
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
    fn a_route_reads_its_own_action_only_and_as_any_frame_reads() {
        let frame = r#"{"limit":7,"requestId":"r","action":"sync","cursor":"c"}"#;
        let r: RouteRequest<super::super::Sync> = serde_json::from_str(frame).unwrap();
        assert_eq!(r.request_id.map(String::from).as_deref(), Some("r"));
        assert_eq!((r.command.limit, r.command.cursor.as_deref()), (Some(7), Some("c")));
        let read = |frame| serde_json::from_str::<RouteRequest<super::super::Sync>>(frame);
        for frame in [
            r#"{"action":"ack","messageIds":["a"]}"#,
            r#"{"action":"nope"}"#,
            r#"{"action":5}"#,
            r#"{"action":"sync","action":"ack"}"#,
            r#"{"action":"sync","limit":"x"}"#,
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
