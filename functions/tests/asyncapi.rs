//! docs/asyncapi.yaml against the code: every action has a request and a
//! response message, every server frame type a message, the enums are the
//! code's, and every example parses as the frame it shows (a request as the
//! server reads it, an answer's data as the command's result type), so a
//! field the document misspells or leaves out fails here. The wake-up, which
//! a push service carries rather than the WebSocket, has its own channel.

use std::collections::BTreeSet;

use courier_core::protocol::{Acked, Action};
use courier_core::protocol::{
    AttachmentCreated, AttachmentLink, ChatCreated, ChatList, DeviceIdentities, DevicesSent, Empty,
    ErrorCode, KeyBundles, KeysStored, MessageSent, Participants, Receipts, Request, ServerFrame, Status,
    SyncPage,
};
use courier_testkit::template::{Template, root};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn document() -> Value {
    let path = root().join("docs/asyncapi.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Template::parse(&text).doc
}

/// Every error code, as `schemas.ErrorCode` should list them.
const ERROR_CODES: [ErrorCode; 9] = [
    ErrorCode::BadRequest,
    ErrorCode::UnknownAction,
    ErrorCode::Unauthorized,
    ErrorCode::Forbidden,
    ErrorCode::NotFound,
    ErrorCode::LimitExceeded,
    ErrorCode::RateLimited,
    ErrorCode::Internal,
    ErrorCode::MismatchedDevices,
];

/// Every server frame's `type` but `response`'s, as the pushes' messages should show them.
const PUSH_TYPES: [&str; 7] =
    ["newMessage", "chatUpdate", "deviceMessage", "receipt", "typing", "deviceList", "keysLow"];

/// Never called: it stops compiling when the core gains an error code or a
/// server frame that the lists above leave out.
#[allow(dead_code)]
fn the_lists_above_are_complete(code: ErrorCode, frame: ServerFrame<()>) {
    match code {
        ErrorCode::BadRequest
        | ErrorCode::UnknownAction
        | ErrorCode::Unauthorized
        | ErrorCode::Forbidden
        | ErrorCode::NotFound
        | ErrorCode::LimitExceeded
        | ErrorCode::RateLimited
        | ErrorCode::Internal
        | ErrorCode::MismatchedDevices => {}
    }
    match frame {
        ServerFrame::Response(_)
        | ServerFrame::NewMessage(_)
        | ServerFrame::ChatUpdate(_)
        | ServerFrame::DeviceMessage(_)
        | ServerFrame::Receipt(_)
        | ServerFrame::Typing(_)
        | ServerFrame::DeviceList(_)
        | ServerFrame::KeysLow(_) => {}
    }
}

/// Whether `data` reads as the result type of `action`'s SUCCESS.
fn check_data(action: Action, data: &Value) -> Result<(), serde_json::Error> {
    fn as_<T: DeserializeOwned>(data: &Value) -> Result<(), serde_json::Error> {
        serde_json::from_str::<T>(&data.to_string()).map(drop)
    }
    match action {
        Action::CreateChat => as_::<ChatCreated>(data),
        Action::SendMessage => as_::<MessageSent>(data),
        Action::CreateAttachment => as_::<AttachmentCreated>(data),
        Action::GetAttachment => as_::<AttachmentLink>(data),
        Action::ModifyChatParticipants => as_::<Participants>(data),
        Action::ListChats => as_::<ChatList>(data),
        Action::Sync => as_::<SyncPage>(data),
        Action::Ack => as_::<Acked>(data),
        Action::RemoveDevice
        | Action::MarkRead
        | Action::Typing
        | Action::DeleteAccount
        | Action::RegisterPush
        | Action::UnregisterPush => as_::<Empty>(data),
        Action::UploadKeys => as_::<KeysStored>(data),
        Action::GetKeys => as_::<KeyBundles>(data),
        Action::ListDevices => as_::<DeviceIdentities>(data),
        Action::SendToDevices => as_::<DevicesSent>(data),
        Action::GetReceipts => as_::<Receipts>(data),
    }
}

fn refs(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .map(|items| items.iter().filter_map(|m| m["$ref"].as_str()).map(str::to_owned).collect())
        .unwrap_or_default()
}

fn channel_ref(message: &str) -> String {
    format!("#/channels/root/messages/{message}")
}

fn examples(doc: &Value, message: &str) -> Vec<Value> {
    doc["components"]["messages"][message]["examples"]
        .as_array()
        .map(|e| e.iter().map(|e| e["payload"].clone()).collect())
        .unwrap_or_default()
}

#[test]
fn every_action_has_its_messages_and_operations() {
    let doc = document();
    let messages = doc["components"]["messages"].as_object().expect("components.messages");
    let channel = doc["channels"]["root"]["messages"].as_object().expect("channels.root.messages");
    let send = refs(&doc["operations"]["send"]["messages"]);
    let reply = refs(&doc["operations"]["send"]["reply"]["messages"]);
    let receive = refs(&doc["operations"]["receive"]["messages"]);
    for action in Action::ALL {
        let name = action.name();
        let response = format!("{name}Response");
        for message in [name, response.as_str()] {
            assert!(messages.contains_key(message), "components.messages has no {message}");
            assert_eq!(
                channel[message]["$ref"],
                format!("#/components/messages/{message}"),
                "channels.root.messages.{message}"
            );
        }
        assert!(send.contains(&channel_ref(name)), "operations.send does not send {name}");
        assert!(reply.contains(&channel_ref(&response)), "operations.send's reply lacks {response}");
        assert!(receive.contains(&channel_ref(&response)), "operations.receive lacks {response}");
        assert!(!examples(&doc, name).is_empty(), "{name} has no example");
    }
    assert!(
        reply.contains(&channel_ref("failureResponse")) && receive.contains(&channel_ref("failureResponse"))
    );

    let schemas = &doc["components"]["schemas"];
    let actions: BTreeSet<&str> =
        schemas["Action"]["enum"].as_array().expect("Action.enum").iter().filter_map(Value::as_str).collect();
    assert_eq!(actions, Action::ALL.iter().map(|a| a.name()).collect(), "schemas.Action is Action::ALL");
    let codes: BTreeSet<String> = schemas["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode.enum")
        .iter()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect();
    let expected: BTreeSet<String> =
        ERROR_CODES.iter().map(|c| serde_json::to_value(c).unwrap().as_str().unwrap().to_owned()).collect();
    assert_eq!(codes, expected, "schemas.ErrorCode is every ErrorCode");
}

#[test]
fn every_push_has_a_message_the_client_receives() {
    let doc = document();
    let receive = refs(&doc["operations"]["receive"]["messages"]);
    let messages = doc["components"]["messages"].as_object().expect("components.messages");
    for kind in PUSH_TYPES {
        // A push's message may not share its name with a command's (`typing` is both).
        let found: Vec<&String> = messages
            .keys()
            .filter(|m| !examples(&doc, m).is_empty())
            .filter(|m| examples(&doc, m).iter().all(|e| e["type"] == kind))
            .collect();
        assert_eq!(found.len(), 1, "one message shows the {kind} push: {found:?}");
        assert!(receive.contains(&channel_ref(found[0])), "operations.receive lacks {}", found[0]);
    }
}

#[test]
fn every_example_is_a_frame_courier_reads() {
    let doc = document();
    let messages = doc["components"]["messages"].as_object().expect("components.messages");
    let mut checked = 0;
    // Not a WebSocket frame: the_wake_up_carries_nothing_but_its_type checks it.
    let wake = wake_messages(&doc);
    for name in messages.keys().filter(|m| !wake.contains(*m)) {
        for example in examples(&doc, name) {
            let text = example.to_string();
            if let Some(action) = Action::from_name(name) {
                let request: Request = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("the {name} example is no {name} request ({e}): {text}"));
                assert_eq!(request.command.action(), action, "{text}");
            } else {
                let frame: ServerFrame<Value> = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("the {name} example is no server frame ({e}): {text}"));
                if let ServerFrame::Response(response) = frame {
                    let action = Action::from_name(&response.action)
                        .unwrap_or_else(|| panic!("{name}: no action {}", response.action));
                    match response.status {
                        Status::Success => {
                            assert_eq!(name, &format!("{}Response", response.action), "{text}");
                            let data = response.data.unwrap_or_else(|| panic!("{name}: a SUCCESS has data"));
                            check_data(action, &data).unwrap_or_else(|e| {
                                panic!("{name}: data is no {} result ({e}): {text}", action.name())
                            });
                        }
                        Status::Failure => assert!(response.error.is_some(), "{text}"),
                    }
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} examples");
}

/// The messages of the `wake` channel (what a push service carries).
fn wake_messages(doc: &Value) -> BTreeSet<String> {
    let channel = doc["channels"]["wake"]["messages"].as_object().expect("channels.wake.messages");
    channel
        .values()
        .filter_map(|m| m["$ref"].as_str()?.strip_prefix("#/components/messages/"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_wake_up_carries_nothing_but_its_type() {
    let doc = document();
    let wake = wake_messages(&doc);
    assert_eq!(wake, BTreeSet::from(["wake".to_owned()]), "one message on the wake channel");
    // courier_wake::webpush::WAKE_PAYLOAD, the payload of every platform's wake-up.
    assert_eq!(examples(&doc, "wake"), [serde_json::json!({"type": "wake"})]);
    let schema = &doc["components"]["schemas"]["WakePayload"];
    assert_eq!(schema["additionalProperties"], false, "content-free: no field but type");
    assert_eq!(schema["properties"].as_object().map(|p| p.len()), Some(1));
    assert_eq!(schema["properties"]["type"]["const"], "wake");
    let receive = refs(&doc["operations"]["receiveWake"]["messages"]);
    assert_eq!(receive, BTreeSet::from(["#/channels/wake/messages/wake".to_owned()]));
    assert_eq!(doc["operations"]["receiveWake"]["action"], "receive");
    assert!(
        !refs(&doc["operations"]["receive"]["messages"]).iter().any(|m| m.ends_with("/wake")),
        "a wake-up never comes over the WebSocket"
    );
}
