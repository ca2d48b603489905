//! template.yaml against the code: every action has a route, every route a
//! function, every function a binary and an event file; the tables are
//! schema.rs's; every variable the code reads is set; each function's grants
//! are its handler's calls. cfn-lint and `sam validate --lint` check the
//! template as CloudFormation; this checks it as Courier.

use std::collections::{BTreeMap, BTreeSet};

use courier_aws::lambda::{CONNECT, DEFAULT, DISCONNECT};
use courier_aws::{ENV_VARS, schema};
use courier_core::protocol::Action;
use courier_testkit::template::{Template, root};
use serde_json::{Value, json};

/// `sendMessage` -> `send-message`; `$connect` -> `connect`.
fn binary_of_route(route: &str) -> String {
    let mut out = String::new();
    for c in route.trim_start_matches('$').chars() {
        if c.is_ascii_uppercase() {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// `send-message` -> `SendMessage`.
fn pascal(binary: &str) -> String {
    binary
        .split('-')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
        })
        .collect()
}

fn function_of_binary(binary: &str) -> String {
    format!("{}Function", pascal(binary))
}

fn binaries() -> BTreeSet<String> {
    let dir = root().join("functions/src/bin");
    let entries = std::fs::read_dir(&dir).expect("functions/src/bin");
    entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().and_then(|s| s.to_str()).expect("a UTF-8 name").to_owned())
        .collect()
}

fn binary_source(binary: &str) -> String {
    std::fs::read_to_string(root().join(format!("functions/src/bin/{binary}.rs")))
        .unwrap_or_else(|e| panic!("functions/src/bin/{binary}.rs: {e}"))
}

fn event_files() -> BTreeSet<String> {
    let entries = std::fs::read_dir(root().join("events")).expect("events/");
    entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| p.file_stem().and_then(|s| s.to_str()).expect("a UTF-8 name").to_owned())
        .collect()
}

/// The logical id a `!Ref X`, `!GetAtt X.Attr` or `${X...}` in a `!Sub` names.
fn referenced(value: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(r) = value["Ref"].as_str() {
        out.push(r.to_owned());
    }
    if let Some(r) = value["Fn::GetAtt"][0].as_str() {
        out.push(r.to_owned());
    }
    let sub = match &value["Fn::Sub"] {
        Value::String(s) => Some(s.as_str()),
        Value::Array(parts) => parts.first().and_then(Value::as_str),
        _ => None,
    };
    if let Some(s) = sub {
        for piece in s.split("${").skip(1) {
            let name = piece.split('}').next().unwrap_or_default();
            out.push(name.split('.').next().unwrap_or_default().to_owned());
        }
    }
    out
}

#[test]
fn every_action_has_a_route_and_every_route_a_function() {
    let t = Template::load();
    let routes: BTreeMap<String, &Value> = t
        .of_type("AWS::ApiGatewayV2::Route")
        .into_iter()
        .map(|(_, r)| (r["Properties"]["RouteKey"].as_str().expect("RouteKey").to_owned(), r))
        .collect();
    let mut expected: BTreeSet<String> = Action::ALL.iter().map(|a| a.name().to_owned()).collect();
    expected.extend([CONNECT, DISCONNECT, DEFAULT].map(str::to_owned));
    assert_eq!(
        routes.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "one route per action, plus $connect, $disconnect and $default"
    );

    let api = &t.doc["Resources"]["WebSocketApi"]["Properties"];
    assert_eq!(api["ProtocolType"], "WEBSOCKET");
    assert_eq!(
        api["RouteSelectionExpression"], "$request.body.action",
        "PROTOCOL.md: the action is the route key"
    );

    let route_responses: BTreeSet<String> = t
        .of_type("AWS::ApiGatewayV2::RouteResponse")
        .into_iter()
        .inspect(|(id, r)| assert_eq!(r["Properties"]["RouteResponseKey"], "$default", "{id}"))
        .flat_map(|(_, r)| referenced(&r["Properties"]["RouteId"]))
        .collect();

    for (key, route) in &routes {
        let binary = binary_of_route(key);
        let function = function_of_binary(&binary);
        let props = &route["Properties"];
        assert_eq!(referenced(&props["ApiId"]), ["WebSocketApi"], "route {key}");

        // Route -> integration -> function.
        let target =
            props["Target"]["Fn::Sub"].as_str().unwrap_or_else(|| panic!("route {key}: Target is !Sub"));
        let integration = target
            .strip_prefix("integrations/${")
            .and_then(|s| s.strip_suffix('}'))
            .unwrap_or_else(|| panic!("route {key}: Target {target:?} is not integrations/${{Integration}}"));
        let integration = &t.resource(integration)["Properties"];
        assert_eq!(integration["IntegrationType"], "AWS_PROXY", "route {key}");
        assert_eq!(integration["IntegrationMethod"], "POST", "route {key}: Lambda is invoked with POST");
        let uri = &integration["IntegrationUri"];
        assert!(
            uri["Fn::Sub"].as_str().is_some_and(|s| s.contains(":lambda:path/2015-03-31/functions/")
                && s.contains(&format!("${{{function}.Arn}}"))),
            "route {key} must integrate {function}, not {uri}"
        );

        // Only command and $default routes answer; their answer needs a route response.
        let answers = key != CONNECT && key != DISCONNECT;
        let route_id = t
            .of_type("AWS::ApiGatewayV2::Route")
            .into_iter()
            .find(|(_, r)| r["Properties"]["RouteKey"] == key.as_str())
            .map(|(id, _)| id.to_owned())
            .expect("the route's id");
        assert_eq!(route_responses.contains(&route_id), answers, "route response of {key}");
        assert_eq!(
            props["RouteResponseSelectionExpression"] == "$default",
            answers,
            "RouteResponseSelectionExpression of {key}"
        );

        // API Gateway may invoke the function, from this route only.
        let permitted = t.of_type("AWS::Lambda::Permission").into_iter().any(|(_, p)| {
            let p = &p["Properties"];
            referenced(&p["FunctionName"]) == [function.clone()]
                && p["Principal"] == "apigateway.amazonaws.com"
                && p["SourceArn"]["Fn::Sub"].as_str().is_some_and(|s| s.ends_with(&format!("/*/{key}")))
        });
        assert!(permitted, "no permission for API Gateway to invoke {function} from {key}");

        // The binary runs the edge of that route: its own handler for the
        // connection routes, the command edge typed by that route's own
        // command (and so linking no other command) for the actions.
        let handler = match key.as_str() {
            "$connect" | "$disconnect" | "$default" => binary.replace('-', "_"),
            _ => format!("command_for::<{}>", pascal(&binary)),
        };
        assert!(
            binary_source(&binary).contains(&format!("lambda::{handler}(")),
            "functions/src/bin/{binary}.rs should run lambda::{handler}"
        );
    }
}

#[test]
fn every_function_is_a_binary_with_an_event_file() {
    let t = Template::load();
    let functions = t.of_type("AWS::Serverless::Function");
    let mut built = BTreeSet::new();
    for (id, f) in &functions {
        let binary =
            f["Metadata"]["BuildProperties"]["Binary"].as_str().unwrap_or_else(|| panic!("{id}: Binary"));
        assert_eq!(f["Metadata"]["BuildMethod"], "rust-cargolambda", "{id}");
        assert_eq!(*id, function_of_binary(binary), "the resource of binary {binary}");
        assert_eq!(t.function_property(id, "Runtime"), "provided.al2023", "{id}");
        assert_eq!(t.function_property(id, "Handler"), "bootstrap", "{id}");
        assert_eq!(t.function_property(id, "CodeUri"), "./functions", "{id}: the courier-functions package");
        assert_eq!(t.function_property(id, "Architectures"), json!([{"Ref": "Architecture"}]), "{id}");
        let logs = t.function_property(id, "LoggingConfig");
        let group = t.resource(&referenced(&logs["LogGroup"])[0]);
        assert_eq!(group["Type"], "AWS::Logs::LogGroup", "{id} logs to its own group");
        assert_eq!(group["Properties"]["RetentionInDays"], json!({"Ref": "LogRetentionDays"}), "{id}");
        built.insert(binary.to_owned());
    }
    assert_eq!(built, binaries(), "one function per binary in functions/src/bin, and no other");
    assert_eq!(event_files(), built, "one event file per function in events/, named after its binary");

    let architecture = &t.doc["Parameters"]["Architecture"];
    assert_eq!(architecture["Default"], "arm64");
    assert_eq!(architecture["AllowedValues"], json!(["arm64", "x86_64"]));
}

#[test]
fn connect_goes_through_the_token_authorizer() {
    let t = Template::load();
    let connect = t
        .of_type("AWS::ApiGatewayV2::Route")
        .into_iter()
        .find(|(_, r)| r["Properties"]["RouteKey"] == CONNECT)
        .map(|(_, r)| &r["Properties"])
        .expect("$connect");
    assert_eq!(connect["AuthorizationType"], "CUSTOM");
    let authorizer_id = &referenced(&connect["AuthorizerId"])[0];
    let authorizer = &t.resource(authorizer_id)["Properties"];
    assert_eq!(authorizer["AuthorizerType"], "REQUEST");
    assert_eq!(authorizer["IdentitySource"], json!(["route.request.querystring.token"]));
    assert!(
        authorizer["AuthorizerUri"]["Fn::Sub"]
            .as_str()
            .is_some_and(|s| s.contains("${AuthorizerFunction.Arn}"))
    );
    let permitted = t.of_type("AWS::Lambda::Permission").into_iter().any(|(_, p)| {
        referenced(&p["Properties"]["FunctionName"]) == ["AuthorizerFunction"]
            && p["Properties"]["SourceArn"]["Fn::Sub"]
                .as_str()
                .is_some_and(|s| s.ends_with(&format!("/authorizers/${{{authorizer_id}}}")))
    });
    assert!(permitted, "API Gateway may invoke the authorizer as that authorizer");
    for (key, route) in t.of_type("AWS::ApiGatewayV2::Route") {
        if route["Properties"]["RouteKey"] != CONNECT {
            assert_eq!(
                route["Properties"]["AuthorizationType"], "NONE",
                "{key}: only $connect is authorized"
            );
        }
    }
}

/// The readers of functions/src/lib.rs and the variables each reads.
const READERS: [(&str, &[&str]); 6] = [
    ("courier_functions::courier()", &ENV_VARS),
    ("courier_functions::courier_for_cleanup()", &ENV_VARS),
    ("courier_functions::courier_with_blobs()", &ENV_VARS),
    ("courier_functions::courier_with_wakeups()", &ENV_VARS),
    (
        "courier_functions::verifier()",
        &["COURIER_JWKS_URL", "COURIER_JWT_SECRET", "COURIER_JWT_ISSUER", "COURIER_JWT_AUDIENCE"],
    ),
    ("courier_functions::fanout_check_delay()", &["COURIER_FANOUT_CHECK_SECONDS"]),
];

#[test]
fn the_template_sets_every_variable_the_code_reads() {
    let t = Template::load();

    // lib.rs names no variable that READERS does not know of (ENV_VARS are read by name in shared).
    let lib = std::fs::read_to_string(root().join("functions/src/lib.rs")).expect("functions/src/lib.rs");
    let named: BTreeSet<&str> = lib
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("COURIER_") && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
        .collect();
    let known: BTreeSet<&str> = READERS
        .iter()
        .flat_map(|(_, vars)| vars.iter().copied())
        .filter(|var| !ENV_VARS.contains(var))
        .collect();
    assert_eq!(named, known, "functions/src/lib.rs reads variables this test does not check");

    for binary in binaries() {
        let source = binary_source(&binary);
        let function = function_of_binary(&binary);
        let env = t.environment(&function);
        for (reader, vars) in READERS {
            if source.contains(reader) {
                for var in vars {
                    assert!(
                        env.contains_key(*var),
                        "{function} runs {reader}, which reads {var}: the template must set it"
                    );
                }
            }
        }
    }

    // Each of Names::from_env's variables names the resource it should.
    let globals = &t.globals()["Environment"]["Variables"];
    for table in schema::TABLES {
        let var = format!("COURIER_{}_TABLE", table.logical.to_ascii_uppercase());
        assert!(ENV_VARS.contains(&var.as_str()), "{var} is one of ENV_VARS");
        assert_eq!(globals[&var], json!({"Ref": format!("{}Table", table.logical)}), "{var}");
    }
    assert_eq!(globals["COURIER_JOBS_QUEUE_URL"], json!({"Ref": "JobsQueue"}), "Ref of a queue is its URL");
    assert_eq!(globals["COURIER_WAKES_QUEUE_URL"], json!({"Ref": "WakesQueue"}), "Ref of a queue is its URL");
    assert_eq!(globals["COURIER_MEDIA_BUCKET"], json!({"Ref": "MediaBucket"}), "Ref of a bucket is its name");
    let endpoint = json!({"Fn::Sub": "https://${WebSocketApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${StageName}"});
    assert_eq!(globals["COURIER_CONNECTIONS_ENDPOINT"], endpoint, "the management API of the stage");
    assert_eq!(t.doc["Outputs"]["ConnectionsEndpoint"]["Value"], endpoint);
    assert_eq!(
        t.doc["Outputs"]["WebSocketUrl"]["Value"],
        json!({"Fn::Sub": "wss://${WebSocketApi}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${StageName}"})
    );

    // The secret never sits in the template: a Secrets Manager reference, or a NoEcho parameter.
    let secret = &t.environment("AuthorizerFunction")["COURIER_JWT_SECRET"]["Fn::If"];
    assert_eq!(secret[0], "HasJwtSecretId");
    assert!(
        secret[1]["Fn::Sub"]
            .as_str()
            .is_some_and(|s| s.starts_with("{{resolve:secretsmanager:${JwtSecretId}"))
    );
    assert_eq!(secret[2], json!({"Ref": "JwtSecret"}));
    assert_eq!(t.doc["Parameters"]["JwtSecret"]["NoEcho"], true);
}

fn seconds(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().expect("whole seconds"),
        Value::String(s) => s.parse().expect("whole seconds"),
        other => panic!("not a number of seconds: {other}"),
    }
}

#[test]
fn timeouts_leave_room_for_each_other() {
    let t = Template::load();
    let send_timeout = seconds(&t.function_property("SendMessageFunction", "Timeout"));
    let check = seconds(&t.environment("FanoutFunction")["COURIER_FANOUT_CHECK_SECONDS"]);
    assert!(
        check > send_timeout,
        "the fan-out check ({check} s) must wait out a running send ({send_timeout} s)"
    );
    assert!(check <= 900, "SQS delays a message by at most 15 minutes");
    assert!(
        send_timeout * 1000 < courier_aws::LATE_ROW_MS as u64,
        "a group position moves only past ids older than {} ms: a send ({send_timeout} s) must land its row sooner",
        courier_aws::LATE_ROW_MS
    );
    for (id, _) in t.of_type("AWS::Serverless::Function") {
        let timeout = seconds(&t.function_property(id, "Timeout"));
        let routed = t.of_type("AWS::ApiGatewayV2::Integration").into_iter().any(|(_, i)| {
            i["Properties"]["IntegrationUri"]["Fn::Sub"]
                .as_str()
                .is_some_and(|s| s.contains(&format!("${{{id}.Arn}}")))
        });
        if routed || id == "AuthorizerFunction" {
            assert!(timeout <= 29, "{id}: API Gateway gives up on an integration after 29 s");
        }
    }
    for (function, queue) in [("DeliverFunction", "JobsQueue"), ("WakeFunction", "WakesQueue")] {
        let timeout = seconds(&t.function_property(function, "Timeout"));
        let visibility = seconds(&t.resource(queue)["Properties"]["VisibilityTimeout"]);
        assert!(visibility >= 6 * timeout, "{queue}'s visibility timeout should be 6x {function}'s timeout");
    }
}

#[test]
fn the_tables_are_schema_rs_tables() {
    let t = Template::load();
    let tables = t.of_type("AWS::DynamoDB::Table");
    assert_eq!(
        tables.iter().map(|(id, _)| id.to_string()).collect::<BTreeSet<_>>(),
        schema::TABLES.iter().map(|s| format!("{}Table", s.logical)).collect::<BTreeSet<_>>(),
        "one table per schema::TABLES entry, named {{Logical}}Table"
    );
    let key_schema = |hash: schema::Key, range: Option<schema::Key>| {
        let mut keys = vec![json!({"AttributeName": hash.name, "KeyType": "HASH"})];
        keys.extend(range.map(|r| json!({"AttributeName": r.name, "KeyType": "RANGE"})));
        Value::Array(keys)
    };
    for table in schema::TABLES {
        let id = format!("{}Table", table.logical);
        let props = &t.resource(&id)["Properties"];
        assert_eq!(props["KeySchema"], key_schema(table.hash, table.range), "{id} keys");
        let mut attributes: BTreeMap<&str, &str> = BTreeMap::from([(table.hash.name, table.hash.kind)]);
        attributes.extend(table.range.map(|r| (r.name, r.kind)));
        let indexes = props["GlobalSecondaryIndexes"].as_array().cloned().unwrap_or_default();
        assert_eq!(indexes.len(), table.indexes.len(), "{id} indexes");
        for index in table.indexes {
            attributes.insert(index.hash.name, index.hash.kind);
            attributes.extend(index.range.map(|r| (r.name, r.kind)));
            let declared = indexes.iter().find(|i| i["IndexName"] == index.name);
            let declared = declared.unwrap_or_else(|| panic!("{id} has no index {}", index.name));
            assert_eq!(
                declared["KeySchema"],
                key_schema(index.hash, index.range),
                "{id} index {}",
                index.name
            );
            assert_eq!(
                declared["Projection"]["ProjectionType"], "KEYS_ONLY",
                "as schema::create_tables makes it"
            );
        }
        let declared: BTreeMap<&str, &str> = props["AttributeDefinitions"]
            .as_array()
            .expect("AttributeDefinitions")
            .iter()
            .map(|a| {
                (
                    a["AttributeName"].as_str().unwrap_or_default(),
                    a["AttributeType"].as_str().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(declared, attributes, "{id} attribute definitions");
        match table.ttl {
            Some(ttl) => assert_eq!(
                props["TimeToLiveSpecification"],
                json!({"AttributeName": ttl, "Enabled": true}),
                "{id} TTL"
            ),
            None => assert!(props["TimeToLiveSpecification"].is_null(), "{id} has no TTL in schema.rs"),
        }
        match table.stream {
            true => assert_eq!(
                props["StreamSpecification"],
                json!({"StreamViewType": "NEW_IMAGE"}),
                "{id} stream"
            ),
            false => assert!(props["StreamSpecification"].is_null(), "{id} streams nothing"),
        }
        assert_eq!(props["BillingMode"], "PAY_PER_REQUEST", "{id}");
        assert_eq!(
            props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"], true,
            "{id} PITR"
        );
        assert_eq!(props["SSESpecification"]["SSEEnabled"], true, "{id} encryption");
        assert_eq!(t.resource(&id)["DeletionPolicy"], "Retain", "{id} holds users' data");
    }
}

#[test]
fn streams_queues_and_schedule_feed_the_right_functions() {
    let t = Template::load();
    let mappings = t.of_type("AWS::Lambda::EventSourceMapping");
    let mapping_of = |function: &str| {
        mappings
            .iter()
            .find(|(_, m)| referenced(&m["Properties"]["FunctionName"]) == [function])
            .map(|(_, m)| &m["Properties"])
            .unwrap_or_else(|| panic!("no event source mapping feeds {function}"))
    };

    let stream = mapping_of("FanoutFunction");
    assert_eq!(stream["EventSourceArn"], json!({"Fn::GetAtt": ["MessagesTable", "StreamArn"]}));
    assert_eq!(stream["BisectBatchOnFunctionError"], true);
    assert_eq!(
        stream["FunctionResponseTypes"],
        json!(["ReportBatchItemFailures"]),
        "handlers::fanout reports failed records"
    );
    assert!(
        stream["MaximumRetryAttempts"].as_i64().is_some_and(|n| (0..=10).contains(&n)),
        "bounded retries"
    );
    assert!(
        stream["MaximumRecordAgeInSeconds"].as_i64().is_some_and(|n| (60..=86_400).contains(&n)),
        "bounded age"
    );
    let failed = referenced(&stream["DestinationConfig"]["OnFailure"]["Destination"]);
    assert_eq!(t.resource(&failed[0])["Type"], "AWS::SQS::Queue", "an on-failure destination");

    // Each job queue feeds its own function, whose binary runs that queue's handler.
    for (function, binary, queue, dlq) in [
        ("DeliverFunction", "deliver", "JobsQueue", "JobsDeadLetterQueue"),
        ("WakeFunction", "wake", "WakesQueue", "WakesDeadLetterQueue"),
    ] {
        let mapping = mapping_of(function);
        assert_eq!(mapping["EventSourceArn"], json!({"Fn::GetAtt": [queue, "Arn"]}), "{function}");
        assert_eq!(
            mapping["FunctionResponseTypes"],
            json!(["ReportBatchItemFailures"]),
            "lambda::{binary} reports failed jobs"
        );
        assert!(
            binary_source(binary).contains(&format!("lambda::{binary}(")),
            "functions/src/bin/{binary}.rs should run lambda::{binary}"
        );
        let redrive = &t.resource(queue)["Properties"]["RedrivePolicy"];
        assert_eq!(redrive["deadLetterTargetArn"], json!({"Fn::GetAtt": [dlq, "Arn"]}), "{queue}");
        assert!(redrive["maxReceiveCount"].as_i64().is_some_and(|n| n > 1), "{queue}");
    }

    let events = &t.resource("CleanupFunction")["Properties"]["Events"];
    let schedule = events.as_object().and_then(|e| e.values().next()).expect("cleanup has an event");
    assert_eq!(schedule["Type"], "Schedule", "an EventBridge rule: handlers::cleanup takes its event");
    assert_eq!(mappings.len(), 3, "no other event source mappings");

    for dlq in ["JobsDeadLetterQueue", "WakesDeadLetterQueue", &failed[0]] {
        let alarmed = t.of_type("AWS::CloudWatch::Alarm").into_iter().any(|(_, a)| {
            a["Properties"]["Dimensions"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| referenced(&d["Value"]) == [dlq.to_owned()]))
        });
        assert!(alarmed, "{dlq} has a depth alarm");
    }
}

/// The functions whose handlers push or close connections (Push::post,
/// Push::close). Since protocol version 2 that includes ack (receipts),
/// cleanup (deviceList when a device expires) and every new command but
/// the read-only listDevices and getReceipts.
const PUSHERS: [&str; 14] = [
    "connect",
    "create-chat",
    "send-message",
    "modify-chat-participants",
    "remove-device",
    "deliver",
    "ack",
    "cleanup",
    "upload-keys",
    "get-keys",
    "send-to-devices",
    "mark-read",
    "typing",
    "delete-account",
];

/// The functions whose handlers delete stored attachment bytes (Blobs::delete).
const BLOB_DELETERS: [&str; 1] = ["delete-account"];

#[test]
fn grants_are_scoped_to_the_stacks_own_resources() {
    let t = Template::load();
    for (id, f) in t.of_type("AWS::Serverless::Function") {
        assert!(f["Properties"]["Role"].is_null(), "{id}: SAM makes one role per function");
        let binary = f["Metadata"]["BuildProperties"]["Binary"].as_str().unwrap_or_default();
        let mut manages = false;
        let mut deletes = false;
        for statement in t.statements(id) {
            assert_eq!(statement["Effect"], "Allow", "{id}");
            let actions = match &statement["Action"] {
                Value::String(a) => vec![a.clone()],
                Value::Array(a) => a.iter().filter_map(|a| a.as_str().map(str::to_owned)).collect(),
                other => panic!("{id}: Action {other}"),
            };
            for action in &actions {
                assert!(!action.contains('*'), "{id}: no wildcard actions ({action})");
            }
            let resources = match &statement["Resource"] {
                Value::Array(r) => r.clone(),
                one => vec![one.clone()],
            };
            for resource in &resources {
                assert_ne!(resource, "*", "{id}: every grant names its resources");
                let names = referenced(resource);
                assert!(
                    names.iter().any(|n| t.resources().contains_key(n)),
                    "{id}: {resource} is not one of this stack's resources"
                );
            }
            if actions.iter().any(|a| a == "s3:DeleteObject") {
                assert!(
                    BLOB_DELETERS.contains(&binary),
                    "{id}: s3:DeleteObject, but its handler deletes no blob"
                );
                deletes = true;
            }
            if actions.iter().any(|a| a == "execute-api:ManageConnections") {
                manages = true;
                for resource in &resources {
                    let arn = resource["Fn::Sub"].as_str().unwrap_or_default();
                    assert!(
                        arn.contains(":${WebSocketApi}/${StageName}/") && arn.ends_with("/@connections/*"),
                        "{id}: ManageConnections on this stage's @connections only, not {arn}"
                    );
                }
            }
        }
        assert_eq!(
            manages,
            PUSHERS.contains(&binary),
            "{id}: execute-api:ManageConnections iff its handler pushes"
        );
        assert_eq!(
            deletes,
            BLOB_DELETERS.contains(&binary),
            "{id}: s3:DeleteObject iff its handler deletes blobs"
        );
    }
    assert!(
        t.resource("AuthorizerFunction")["Properties"]["Policies"].is_null(),
        "the authorizer calls nothing"
    );
    assert!(t.resource("DefaultFunction")["Properties"]["Policies"].is_null(), "$default calls nothing");
}

/// The functions whose handlers enqueue Wake jobs (`Courier::enqueue_wake`:
/// the send paths and the jobs that push them) or Release jobs
/// (`Courier::release`: whatever drops a push registration), which
/// `SqsJobs` sends to the wake-up queue.
const WAKE_ENQUEUERS: [&str; 9] = [
    "send-message",
    "send-to-devices",
    "deliver",
    "wake",
    "register-push",
    "unregister-push",
    "remove-device",
    "delete-account",
    "cleanup",
];

/// A function's statements, those of policies under a condition (`!If`,
/// either branch) too.
fn all_statements(t: &Template, id: &str) -> Vec<Value> {
    let policies = t.resource(id)["Properties"]["Policies"].as_array().cloned().unwrap_or_default();
    policies
        .iter()
        .flat_map(|p| match p["Fn::If"].as_array() {
            Some(branches) => branches.iter().skip(1).cloned().collect(),
            None => vec![p.clone()],
        })
        .flat_map(|p| p["Statement"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn actions(statement: &Value) -> Vec<String> {
    match &statement["Action"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a.iter().filter_map(|a| a.as_str().map(str::to_owned)).collect(),
        other => panic!("Action {other}"),
    }
}

#[test]
fn only_the_wake_function_talks_to_push_services() {
    let t = Template::load();
    for (id, f) in t.of_type("AWS::Serverless::Function") {
        let binary = f["Metadata"]["BuildProperties"]["Binary"].as_str().unwrap_or_default();
        let statements = all_statements(&t, id);
        let granted: BTreeSet<String> = statements.iter().flat_map(actions).collect();
        let on = |queue: &str, action: &str| {
            statements.iter().any(|s| {
                actions(s).iter().any(|a| a == action) && referenced(&s["Resource"]) == [queue.to_owned()]
            })
        };

        // SNS, SSM and Web Push are linked by wake (wake-ups, releases) and
        // by registerPush (which makes the endpoints) alone.
        let sns: BTreeSet<&str> =
            granted.iter().filter(|a| a.starts_with("sns:")).map(String::as_str).collect();
        let expected: BTreeSet<&str> = match binary {
            "wake" => ["sns:Publish", "sns:DeleteEndpoint"].into(),
            "register-push" => {
                ["sns:CreatePlatformEndpoint", "sns:SetEndpointAttributes", "sns:DeleteEndpoint"].into()
            }
            _ => BTreeSet::new(),
        };
        assert_eq!(sns, expected, "{id}: the SNS calls its handler makes");
        assert_eq!(
            granted.contains("ssm:GetParameter"),
            binary == "wake",
            "{id}: only wake reads the VAPID key"
        );
        assert!(!granted.iter().any(|a| a.starts_with("kms:")), "{id}: SSM decrypts with aws/ssm");

        assert_eq!(
            on("WakesQueue", "sqs:SendMessage"),
            WAKE_ENQUEUERS.contains(&binary),
            "{id}: sqs:SendMessage on WakesQueue iff its handler enqueues Wake or Release jobs"
        );
        assert_eq!(on("WakesQueue", "sqs:ReceiveMessage"), binary == "wake", "{id}: WakesQueue's consumer");
        assert_eq!(on("JobsQueue", "sqs:ReceiveMessage"), binary == "deliver", "{id}: JobsQueue's consumer");
    }
}

#[test]
fn the_bucket_is_private_encrypted_and_expires_objects() {
    let t = Template::load();
    let bucket = &t.resource("MediaBucket")["Properties"];
    let block = &bucket["PublicAccessBlockConfiguration"];
    for setting in ["BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"] {
        assert_eq!(block[setting], true, "{setting}");
    }
    assert!(!bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"].is_null());
    let rules = bucket["LifecycleConfiguration"]["Rules"].as_array().expect("lifecycle rules");
    assert!(
        rules.iter().any(|r| r["Status"] == "Enabled" && r["ExpirationInDays"] == 30),
        "PROTOCOL.md: 30 days"
    );
    let cors = bucket["CorsConfiguration"]["CorsRules"].as_array().expect("CORS for browser uploads");
    assert!(cors.iter().any(|r| r["AllowedMethods"].as_array().is_some_and(|m| m.contains(&json!("PUT")))));
}

/// samconfig.toml as `[section]` -> key -> raw value: enough for what is checked here.
fn samconfig() -> BTreeMap<String, BTreeMap<String, String>> {
    let text = std::fs::read_to_string(root().join("samconfig.toml")).expect("samconfig.toml");
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_owned();
        } else if let Some((key, value)) = line.split_once('=') {
            sections
                .entry(current.clone())
                .or_default()
                .insert(key.trim().to_owned(), value.trim().to_owned());
        }
    }
    sections
}

#[test]
fn samconfig_builds_with_beta_features_for_dev_and_prod() {
    let config = samconfig();
    for env in ["default", "prod"] {
        let build = &config[&format!("{env}.build.parameters")];
        assert_eq!(build["beta_features"], "true", "{env}: rust-cargolambda is a beta build method");
        assert_eq!(build["cached"], "true", "{env}");
        // One function at a time: parallel cold builds raced in cargo-lambda
        // ("File exists"), and cargo's target-dir lock serialised them anyway.
        assert_eq!(build["parallel"], "false", "{env}");
        assert_eq!(config[&format!("{env}.validate.parameters")]["lint"], "true", "{env}");
        let deploy = &config[&format!("{env}.deploy.parameters")];
        assert!(deploy["capabilities"].contains("CAPABILITY_IAM"), "{env}: the functions' roles");
        assert!(!deploy["parameter_overrides"].contains("JwtSecret="), "{env}: no secret in samconfig.toml");
        assert!(config[&format!("{env}.global.parameters")].contains_key("stack_name"), "{env}");
    }
}

/// `sam build --cached` hashes CodeUri (./functions) alone; these links put
/// the crates and lock file the functions are built from inside it.
#[cfg(unix)]
#[test]
fn sam_cache_inputs_link_the_workspace() {
    let dir = root().join("functions/.sam-cache-inputs");
    for (link, target) in [("shared", "shared"), ("Cargo.toml", "Cargo.toml"), ("Cargo.lock", "Cargo.lock")] {
        let path = dir.join(link);
        let meta = std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(meta.file_type().is_symlink(), "{} is a symlink", path.display());
        assert_eq!(
            std::fs::canonicalize(&path).expect("the link resolves"),
            std::fs::canonicalize(root().join(target)).expect("the target exists"),
            "{}",
            path.display()
        );
    }
    // Every workspace crate the functions are built from lives under shared/.
    let manifest =
        std::fs::read_to_string(root().join("functions/Cargo.toml")).expect("functions/Cargo.toml");
    for line in manifest.lines().filter(|l| l.starts_with("courier-")) {
        let name = line.split(['.', ' ', '=']).next().unwrap_or_default();
        let dir = name.strip_prefix("courier-").unwrap_or_default();
        assert!(
            root().join("shared").join(dir).join("Cargo.toml").is_file(),
            "functions/.sam-cache-inputs misses a crate: {line}"
        );
    }
}

#[test]
fn every_route_is_deployed_and_every_function_watched() {
    let t = Template::load();
    // AutoDeploy deploys what exists when the stage is made: a route the
    // stage does not wait for may be missing from the first deployment.
    let waits: BTreeSet<&str> = t.resource("Stage")["DependsOn"]
        .as_array()
        .expect("Stage DependsOn")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for (id, _) in t.of_type("AWS::ApiGatewayV2::Route") {
        assert!(waits.contains(id), "the Stage does not depend on {id}");
    }

    // Each function's own failures raise an alarm, except the authorizer's:
    // its errors are refused tokens.
    let alarmed: BTreeSet<String> = t
        .of_type("AWS::CloudWatch::Alarm")
        .into_iter()
        .filter(|(_, a)| a["Properties"]["MetricName"] == "Errors")
        .flat_map(|(_, a)| referenced(&a["Properties"]["Dimensions"][0]["Value"]))
        .collect();
    for (id, _) in t.of_type("AWS::Serverless::Function") {
        assert_eq!(alarmed.contains(id), id != "AuthorizerFunction", "{id}'s Errors alarm");
    }

    // The output that names the tables names them all.
    let outputs = &t.doc["Outputs"]["TableNames"]["Value"]["Fn::Join"][1];
    let named: BTreeSet<String> =
        outputs.as_array().expect("TableNames joins a list").iter().flat_map(referenced).collect();
    let tables: BTreeSet<String> = schema::TABLES.iter().map(|s| format!("{}Table", s.logical)).collect();
    assert_eq!(named, tables, "Outputs.TableNames");
}
