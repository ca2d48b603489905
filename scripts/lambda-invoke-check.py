"""Helper of scripts/lambda-invoke-check: the parts that speak AWS's APIs.

    provision  create what template.yaml declares (tables, queues, bucket) on
               moto, and write the environment the template gives the functions
    run        invoke every function with its events/<function>.json through
               `cargo lambda invoke`, seeding what the fixed ids in the events
               name, and check each answer; every AWS call a function made
               (as courier-recorder logged it) must be one that template.yaml
               grants that function (a grant under a condition counts as the
               parameters' defaults decide it)

template.yaml comes as the JSON the test kit's `courier-template` prints (the
template tests' reader); the calls as the test kit's `courier-recorder` logs
them, named as the cost tests' meter names them. Run by
scripts/lambda-invoke-check with the venv's python (boto3 comes with moto).
Standard library otherwise.
"""

import argparse
import base64
import fnmatch
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "courier-check"
# The HS256 secret events/authorizer.json's token is signed with (never deploy with it).
EVENTS_SECRET = "courier-events-secret"
ATTACHMENT_BODY = b"courier attachment\n"


def template(path):
    with open(path) as f:
        return json.load(f)


def parameters(t):
    """The stack's parameters as the check deploys it: the defaults, stage `check`.
    Every push platform is off then (their parameters default to empty)."""
    params = {k: str(v.get("Default", "")) for k, v in t["Parameters"].items()}
    params["StageName"] = "check"
    return params


def holds(t, params, condition):
    """Whether the template's condition `condition` holds with these parameters."""

    def value(v):
        if not isinstance(v, dict):
            return v
        if "Ref" in v:
            return params[v["Ref"]]
        if "Condition" in v:
            return holds(t, params, v["Condition"])
        if "Fn::Equals" in v:
            a, b = v["Fn::Equals"]
            return str(value(a)) == str(value(b))
        if "Fn::Not" in v:
            return not value(v["Fn::Not"][0])
        if "Fn::Or" in v:
            return any(value(c) for c in v["Fn::Or"])
        if "Fn::And" in v:
            return all(value(c) for c in v["Fn::And"])
        sys.exit(f"lambda-invoke-check: cannot evaluate {v} in condition {condition}")

    return value(t["Conditions"][condition])


def resolved(t, params, value):
    """`value` with each Fn::If taken as its condition decides, and AWS::NoValue left out."""
    no_value = {"Ref": "AWS::NoValue"}
    if isinstance(value, dict):
        if "Fn::If" in value:
            condition, then, otherwise = value["Fn::If"]
            return resolved(t, params, then if holds(t, params, condition) else otherwise)
        out = {k: resolved(t, params, v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v != no_value}
    if isinstance(value, list):
        return [v for v in (resolved(t, params, v) for v in value) if v != no_value]
    return value


def client(service, endpoint):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


# ------------------------------------------------------------------ provision


def provision(args):
    t = template(args.template)
    resources = t["Resources"]
    ddb = client("dynamodb", args.endpoint)
    sqs = client("sqs", args.endpoint)
    s3 = client("s3", args.endpoint)
    names = {}  # logical id -> what !Ref gives

    for logical, r in resources.items():
        if r["Type"] != "AWS::DynamoDB::Table":
            continue
        p = r["Properties"]
        name = f"{PREFIX}-{logical}"
        create = dict(
            TableName=name,
            KeySchema=p["KeySchema"],
            AttributeDefinitions=p["AttributeDefinitions"],
            BillingMode=p["BillingMode"],
        )
        if "GlobalSecondaryIndexes" in p:
            create["GlobalSecondaryIndexes"] = p["GlobalSecondaryIndexes"]
        if "StreamSpecification" in p:
            create["StreamSpecification"] = {"StreamEnabled": True, **p["StreamSpecification"]}
        ddb.create_table(**create)
        if "TimeToLiveSpecification" in p:
            ddb.update_time_to_live(TableName=name, TimeToLiveSpecification=p["TimeToLiveSpecification"])
        names[logical] = name

    queues = [logical for logical, r in resources.items() if r["Type"] == "AWS::SQS::Queue"]
    # Dead-letter queues first: the others name them.
    queues.sort(key=lambda q: "RedrivePolicy" in resources[q]["Properties"])
    arns = {}
    for logical in queues:
        p = resources[logical]["Properties"]
        attributes = {}
        if "VisibilityTimeout" in p:
            attributes["VisibilityTimeout"] = str(p["VisibilityTimeout"])
        if "RedrivePolicy" in p:
            dlq = p["RedrivePolicy"]["deadLetterTargetArn"]["Fn::GetAtt"][0]
            redrive = {"deadLetterTargetArn": arns[dlq], "maxReceiveCount": p["RedrivePolicy"]["maxReceiveCount"]}
            attributes["RedrivePolicy"] = json.dumps(redrive)
        url = sqs.create_queue(QueueName=f"{PREFIX}-{logical}", Attributes=attributes)["QueueUrl"]
        arns[logical] = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        names[logical] = url

    for logical, r in resources.items():
        if r["Type"] == "AWS::S3::Bucket":
            name = f"{PREFIX}-{logical.lower()}"
            s3.create_bucket(Bucket=name)
            names[logical] = name

    # The functions' environment as the template sets it, resolved against moto.
    params = parameters(t)
    env = {}
    variables = dict(t["Globals"]["Function"]["Environment"]["Variables"])
    for r in resources.values():
        if r["Type"] == "AWS::Serverless::Function":
            variables.update(r["Properties"].get("Environment", {}).get("Variables", {}))
    for var, value in variables.items():
        if isinstance(value, str):
            env[var] = value
        elif "Ref" in value:
            ref = value["Ref"]
            env[var] = names[ref] if ref in names else params[ref]
        elif var == "COURIER_CONNECTIONS_ENDPOINT":
            env[var] = f"{args.recorder}/{params['StageName']}"
        elif var == "COURIER_JWT_SECRET":
            env[var] = EVENTS_SECRET
        else:
            sys.exit(f"provision: no local value for {var} = {value}")
    env["RUST_LOG"] = "info"
    env.update(
        AWS_ENDPOINT_URL=args.recorder,
        AWS_REGION="us-east-1",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    with open(args.env_file, "w") as f:
        for k, v in sorted(env.items()):
            f.write(f"{k}={v}\n")
    with open(args.names_file, "w") as f:
        json.dump(names, f, indent=2)
    print(f"provisioned {len(names)} resources on {args.endpoint}")


# ------------------------------------------------------------ recorded calls


def recorded(path):
    """The AWS calls courier-recorder logged: {request, method, path, body}, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# Transactions are authorized per item, as the item's own action.
ITEM_ACTIONS = {"Put": "PutItem", "Update": "UpdateItem", "Delete": "DeleteItem",
                "ConditionCheck": "ConditionCheckItem", "Get": "GetItem"}


def authorized_as(call, logical):
    """What IAM authorizes a recorded call as: [(action, resource)], resources by logical id."""
    service, operation = call["request"].split(".", 1)
    if service == "ApiGatewayManagementApi":
        return [("execute-api:ManageConnections", f"@connections/{call['method']}")]
    if service == "S3":
        # Path-style: /bucket/key. HeadObject is authorized as s3:GetObject.
        bucket, _, key = urllib.parse.urlparse(call["path"]).path.lstrip("/").partition("/")
        action = "GetObject" if operation == "HeadObject" else operation
        return [(f"s3:{action}", logical(bucket) + (f"/{urllib.parse.unquote(key)}" if key else ""))]
    request = json.loads(call["body"] or "{}")
    if service == "SQS":
        return [(f"sqs:{operation}", logical(request.get("QueueUrl", "?")))]
    if service != "DynamoDB":
        return [(call["request"], "?")]
    if operation in ("BatchGetItem", "BatchWriteItem"):
        return [(f"dynamodb:{operation}", logical(name)) for name in request.get("RequestItems", {})]
    if operation in ("TransactWriteItems", "TransactGetItems"):
        return [(f"dynamodb:{ITEM_ACTIONS[kind]}", logical(spec["TableName"]))
                for item in request.get("TransactItems", []) for kind, spec in item.items()]
    table = logical(request["TableName"])
    index = request.get("IndexName")
    return [(f"dynamodb:{operation}", f"{table}/index/{index}" if index else table)]


def granted(t):
    """Each function's grants: {function logical id: {(action, resource pattern)}}."""

    def resource_of(r):
        if isinstance(r, str):
            return r
        if "Fn::GetAtt" in r:
            logical, attribute = r["Fn::GetAtt"]
            return logical if attribute == "Arn" else f"{logical}/stream"
        if "Ref" in r:
            return r["Ref"]
        sub = r["Fn::Sub"]
        if not isinstance(sub, str):
            # An ARN made from parameters (a push platform's SNS endpoints):
            # kept whole, it matches no call the recorder logs.
            return json.dumps(sub)
        if "@connections" in sub:
            # .../${WebSocketApi}/${StageName}/POST/@connections/* -> @connections/POST
            return "@connections/" + sub.split("/")[-3]
        logical = sub.split("${", 1)[1].split(".", 1)[0]
        return logical + sub.split("}", 1)[1]

    grants = {}
    # Policies granted under a condition (the push platforms') as the check's parameters decide.
    params = parameters(t)
    for logical, r in t["Resources"].items():
        if r["Type"] != "AWS::Serverless::Function":
            continue
        pairs = grants.setdefault(logical, set())
        for policy in resolved(t, params, r["Properties"].get("Policies", [])):
            for statement in policy["Statement"]:
                actions = statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
                resources = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
                pairs.update((a, resource_of(res)) for a in actions for res in resources)
    return grants


def function_of(binary):
    return "".join(part.capitalize() for part in binary.split("-")) + "Function"


# ------------------------------------------------------------------------ run


def event(name):
    with open(os.path.join(ROOT, "events", f"{name}.json")) as f:
        return json.load(f)


class Check:
    def __init__(self, args):
        self.args = args
        self.names = json.load(open(args.names_file))
        self.ddb = client("dynamodb", args.endpoint)
        self.s3 = client("s3", args.endpoint)
        self.invoked = set()
        self.failures = []
        # What each function's calls are authorized as: {binary: {(action, resource)}}.
        self.calls = {}
        # Physical names back to logical ids.
        self.logical = {}
        for logical, name in self.names.items():
            self.logical[name] = logical
            self.logical[name.rstrip("/").rsplit("/", 1)[-1]] = logical

    def event(self, name):
        return event(name)

    def invoke(self, function, data_file):
        cmd = [
            "cargo", "lambda", "invoke", function,
            "--invoke-address", "127.0.0.1", "--invoke-port", str(self.args.invoke_port),
            "--data-file", data_file, "--output-format", "json",
        ]
        before = len(recorded(self.args.calls))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{function} did not answer within 300 s") from None
        finally:
            # The recorder logs a call before answering it: the function's are all in.
            pairs = self.calls.setdefault(function, set())
            for call in recorded(self.args.calls)[before:]:
                pairs.update(authorized_as(call, lambda name: self.logical.get(name, name)))
        if done.returncode != 0:
            raise AssertionError(f"cargo lambda invoke {function} failed: {done.stderr.strip() or done.stdout.strip()}")
        return json.loads(done.stdout)

    def call(self, name, expect, change=None):
        """Invokes function `name` with events/<name>.json (changed by `change`, if given) and checks the answer with `expect`."""
        self.invoked.add(name)
        try:
            path = os.path.join(ROOT, "events", f"{name}.json")
            if change:
                ev = self.event(name)
                change(ev)
                path = os.path.join(self.args.work, f"{name}-changed.json")
                with open(path, "w") as f:
                    json.dump(ev, f)
            answer = self.invoke(name, path)
            expect(answer)
            print(f"ok    {name}")
            return answer
        except AssertionError as e:
            print(f"FAIL  {name}: {e}")
            self.failures.append(name)
            return None

    def derived(self, name, label, change):
        """Invokes function `name` with a changed copy of its event (setting up what a fixed event needs)."""
        ev = self.event(name)
        change(ev)
        path = os.path.join(self.args.work, f"{name}-{label}.json")
        with open(path, "w") as f:
            json.dump(ev, f)
        return self.invoke(name, path)

    def pushes(self):
        """The calls to the @connections API: {method (POST or DELETE), connection, body}."""
        return [
            # The SDK percent-encodes the id (API Gateway's end in "=").
            {**call, "connection": urllib.parse.unquote(call["path"].split("/@connections/", 1)[1])}
            for call in recorded(self.args.calls)
            if call["request"].startswith("ApiGatewayManagementApi.")
        ]

    def copy_item(self, table, key_name, old, new):
        name = self.names[table]
        item = self.ddb.get_item(TableName=name, Key={key_name: {"S": old}}, ConsistentRead=True)["Item"]
        item[key_name] = {"S": new}
        self.ddb.put_item(TableName=name, Item=item)


def mint(user, ttl):
    """An HS256 token for `user`, valid for `ttl` seconds from now, signed with EVENTS_SECRET."""
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": user, "iat": now, "exp": now + ttl}).encode())
    signature = hmac.new(EVENTS_SECRET.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(signature)}"


def with_token(token):
    def change(ev):
        ev["queryStringParameters"]["token"] = token
        ev["multiValueQueryStringParameters"]["token"] = [token]

    return change


def frame(answer):
    assert answer.get("statusCode") == 200, f"statusCode {answer.get('statusCode')}: {answer}"
    return json.loads(answer["body"])


def success(name, check=lambda data: None):
    def expect(answer):
        f = frame(answer)
        assert f.get("status") == "SUCCESS", f
        asked = json.loads(event(name)["body"])
        assert f["action"] == asked["action"] and f.get("requestId") == asked.get("requestId"), f
        check(f["data"])

    return expect


def status(code):
    def expect(answer):
        assert answer.get("statusCode") == code, answer

    return expect


def no_batch_failures(answer):
    assert answer == {"batchItemFailures": []}, answer


def run(args):
    c = Check(args)
    state = {}

    def authorized(answer):
        assert answer["principalId"] == "alice", answer
        statement = answer["policyDocument"]["Statement"][0]
        assert statement["Effect"] == "Allow" and statement["Action"] == ["execute-api:Invoke"], answer
        assert answer["context"] == {"userId": "alice", "deviceId": "phone"}, answer

    # The token in events/authorizer.json outlives the authorizer's 24-hour
    # cap on token lifetimes (it has to stay valid for years): sign a fresh
    # one with the same secret, as a client would get one.
    c.call("authorizer", authorized, change=with_token(mint("alice", 3600)))
    c.call("connect", status(200))
    alice_phone = c.event("connect")["requestContext"]["connectionId"]

    # Two more devices, so pushes and removeDevice have someone to reach.
    def as_device(user, device, connection):
        def change(ev):
            ev["requestContext"]["connectionId"] = connection
            ev["requestContext"]["authorizer"].update(principalId=user, userId=user, deviceId=device)

        return change

    for user, device, connection in [("bob", "laptop", "BobLaptopConn0Q="), ("alice", "tablet", "AliceTabletCo0Q=")]:
        answer = c.derived("connect", f"{user}-{device}", as_device(user, device, connection))
        assert answer.get("statusCode") == 200, f"connecting {user}/{device}: {answer}"

    def created(data):
        assert len(data["chatId"]) == 26, data
        state["chat"] = data["chatId"]

    c.call("create-chat", success("create-chat", created))
    told = [p for p in c.pushes() if p["method"] == "POST" and '"chatUpdate"' in p["body"]]
    if {p["connection"] for p in told} != {alice_phone, "BobLaptopConn0Q=", "AliceTabletCo0Q="}:
        print(f"FAIL  create-chat: chatUpdate pushed to {[p['connection'] for p in told]}")
        c.failures.append("create-chat pushes")

    # send-message and modify-chat-participants name a fixed chat: make it a copy of the one just created.
    fixed_chat = json.loads(c.event("send-message")["body"])["chatId"]
    if "chat" in state:
        c.copy_item("ChatsTable", "chatId", state["chat"], fixed_chat)
        participants = c.names["ParticipantsTable"]
        rows = c.ddb.query(
            TableName=participants,
            KeyConditionExpression="chatId = :c",
            ExpressionAttributeValues={":c": {"S": state["chat"]}},
        )["Items"]
        for row in rows:
            row["chatId"] = {"S": fixed_chat}
            c.ddb.put_item(TableName=participants, Item=row)

    def sent(data):
        assert len(data["messageId"]) == 26 and isinstance(data["timestamp"], int), data
        pushed = [p for p in c.pushes() if p["method"] == "POST" and data["messageId"] in p["body"]]
        assert {p["connection"] for p in pushed} == {"BobLaptopConn0Q=", "AliceTabletCo0Q="}, pushed

    c.call("send-message", success("send-message", sent))

    def modified(data):
        assert data["participants"] == ["alice", "bob", "carol"], data

    c.call("modify-chat-participants", success("modify-chat-participants", modified))

    def listed(data):
        ids = {chat["chatId"] for chat in data["chats"]}
        assert ids == {state.get("chat"), fixed_chat}, data

    c.call("list-chats", success("list-chats", listed))

    def upload(data):
        assert data["uploadUrl"].startswith(f"{args.recorder}/"), data
        request = urllib.request.Request(data["uploadUrl"], data=ATTACHMENT_BODY, method="PUT")
        for header, value in data["uploadHeaders"].items():
            request.add_header(header, value)
        with urllib.request.urlopen(request) as response:
            assert response.status == 200, response.status
        state["attachment"] = data["attachmentId"]

    c.call("create-attachment", success("create-attachment", upload))

    # get-attachment names a fixed attachment: make it a copy of the one just uploaded.
    fixed_attachment = json.loads(c.event("get-attachment")["body"])["attachmentId"]
    if "attachment" in state:
        c.copy_item("AttachmentsTable", "attachmentId", state["attachment"], fixed_attachment)
        bucket = c.names["MediaBucket"]
        for obj in c.s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            if state["attachment"] in obj["Key"]:
                target = obj["Key"].replace(state["attachment"], fixed_attachment)
                c.s3.copy_object(Bucket=bucket, Key=target, CopySource={"Bucket": bucket, "Key": obj["Key"]})

    def download(data):
        assert data["attachmentId"] == fixed_attachment, data
        with urllib.request.urlopen(data["downloadUrl"]) as response:
            assert response.read() == ATTACHMENT_BODY, "the downloaded bytes are the uploaded ones"

    c.call("get-attachment", success("get-attachment", download))

    def page(data):
        assert isinstance(data["messages"], list) and "cursor" in data, data

    c.call("sync", success("sync", page))

    def acked(data):
        assert isinstance(data["acked"], int), data

    c.call("ack", success("ack", acked))

    # Protocol version 2. Bob's laptop and alice's tablet publish keys too
    # (the tablet, so that removing it below sends a deviceList), each with
    # an identity key of its own.
    def with_body(**fields):
        def change(ev):
            body = json.loads(ev["body"])
            body.update(fields)
            ev["body"] = json.dumps(body)

        return change

    def both(*changes):
        def change(ev):
            for one in changes:
                one(ev)

        return change

    def keys_of(user, device):
        asked = json.loads(c.event("upload-keys")["body"])
        identity = base64.b64encode(hashlib.sha256(f"{user}/{device}".encode()).digest()).decode()
        return asked | {"identityKey": identity}

    for user, device, connection in [("bob", "laptop", "BobLaptopConn0Q="), ("alice", "tablet", "AliceTabletCo0Q=")]:
        change = both(as_device(user, device, connection), with_body(**keys_of(user, device)))
        answer = c.derived("upload-keys", f"{user}-{device}", change)
        assert frame(answer).get("status") == "SUCCESS", f"keys of {user}/{device}: {answer}"

    def pushed_to(connection, kind):
        return [json.loads(p["body"]) for p in c.pushes()
                if p["method"] == "POST" and p["connection"] == connection and f'"type":"{kind}"' in p["body"]]

    def uploaded(data):
        assert data == {"oneTimePreKeys": len(json.loads(c.event("upload-keys")["body"])["oneTimePreKeys"])}, data
        told = [f for f in pushed_to("BobLaptopConn0Q=", "deviceList") if f["userId"] == "alice"]
        assert any(d["deviceId"] == "phone" for f in told for d in f["devices"]), f"bob was not told: {told}"

    c.call("upload-keys", success("upload-keys", uploaded))

    def got_keys(data):
        [laptop] = data["devices"]
        assert laptop["deviceId"] == "laptop" and laptop["identityKey"] == keys_of("bob", "laptop")["identityKey"], data
        assert laptop["oneTimePreKey"] is not None, data
        assert pushed_to("BobLaptopConn0Q=", "keysLow"), "bob's laptop was not told its keys run low"

    c.call("get-keys", success("get-keys", got_keys))

    def listed_devices(data):
        assert data == {"devices": [{"deviceId": "laptop", "identityKey": keys_of("bob", "laptop")["identityKey"]}]}, data

    c.call("list-devices", success("list-devices", listed_devices))

    def sent_to_devices(data):
        assert len(data["messageId"]) == 26, data
        pushed = [f for f in pushed_to("BobLaptopConn0Q=", "deviceMessage") if f["messageId"] == data["messageId"]]
        assert len(pushed) == 1, pushed

    c.call("send-to-devices", success("send-to-devices", sent_to_devices))

    up_to = json.loads(c.event("mark-read")["body"])["upTo"]

    def marked(data):
        assert data == {}, data
        told = [f for f in pushed_to("BobLaptopConn0Q=", "receipt") if f["userId"] == "alice"]
        assert told and told[-1]["read"] == up_to, told

    c.call("mark-read", success("mark-read", marked))

    def receipts(data):
        mine = [r for r in data["receipts"] if r["userId"] == "alice"]
        assert mine == [{"userId": "alice", "delivered": up_to, "read": up_to}], data

    c.call("get-receipts", success("get-receipts", receipts))

    def typed(data):
        assert data == {}, data
        assert pushed_to("BobLaptopConn0Q=", "typing"), "bob's laptop was not told"

    c.call("typing", success("typing", typed))

    # Push notifications. The check's stack leaves every push platform off
    # (their parameters default to empty), so registerPush refuses the Web
    # Push subscription of its event by name, before any AWS call.
    devices_table = c.names["DevicesTable"]
    phone_key = {"userId": {"S": "alice"}, "deviceId": {"S": "phone"}}

    def push_of_phone():
        item = c.ddb.get_item(TableName=devices_table, Key=phone_key, ConsistentRead=True).get("Item", {})
        return item.get("push")

    def refused_while_off(answer):
        f = frame(answer)
        assert f["action"] == "registerPush" and f["status"] == "FAILURE", f
        assert f["error"]["code"] == "BAD_REQUEST" and "turned off" in f["error"]["message"], f
        assert push_of_phone() is None, "a refused registration is not stored"

    c.call("register-push", refused_while_off)

    # unregisterPush takes away a registration as registerPush stores one
    # (Web Push holds nothing at AWS, so the row is all there is to remove).
    subscription = json.loads(c.event("register-push")["body"])["subscription"]
    c.ddb.update_item(
        TableName=devices_table,
        Key=phone_key,
        UpdateExpression="SET #push = :push",
        ConditionExpression="attribute_exists(deviceId)",
        ExpressionAttributeNames={"#push": "push"},
        ExpressionAttributeValues={":push": {"M": {
            "platform": {"S": "webpush"},
            "address": {"S": subscription["endpoint"]},
            "keys": {"M": {k: {"S": v} for k, v in subscription["keys"].items()}},
        }}},
    )

    def unregistered(data):
        assert data == {}, data
        assert push_of_phone() is None, "the phone's registration is still there"

    c.call("unregister-push", success("unregister-push", unregistered))

    def removed(data):
        assert data == {}, data
        closed = [p["connection"] for p in c.pushes() if p["method"] == "DELETE"]
        assert "AliceTabletCo0Q=" in closed, f"the tablet's connection was not closed: {closed}"

    c.call("remove-device", success("remove-device", removed))

    def unknown(answer):
        f = frame(answer)
        assert f["status"] == "FAILURE" and f["error"]["code"] == "UNKNOWN_ACTION", f

    c.call("default", unknown)
    c.call("fanout", no_batch_failures)
    c.call("deliver", no_batch_failures)
    # A Wake job for alice's phone, which is connected and (after
    # unregister-push) has no registration: begin_wake's conditional update
    # finds nothing to wake, so no push service is called.
    c.call("wake", no_batch_failures)

    def cleaned(answer):
        assert answer is None, answer

    c.call("cleanup", cleaned)

    # Last but the disconnect: it takes alice, her chats and her devices away.
    def deleted(answer):
        assert answer.get("statusCode") == 200 and not answer.get("body"), answer
        answered = [json.loads(p["body"]) for p in c.pushes() if p["method"] == "POST" and p["connection"] == alice_phone]
        assert any(f.get("action") == "deleteAccount" and f.get("status") == "SUCCESS" for f in answered), answered
        closed = [p["connection"] for p in c.pushes() if p["method"] == "DELETE"]
        assert alice_phone in closed, f"alice's phone was not closed: {closed}"

    c.call("delete-account", deleted)
    c.call("disconnect", status(200))

    # Every AWS call a function made must be one the template grants it.
    grants = granted(template(args.template))
    for binary, calls in sorted(c.calls.items()):
        allowed = grants.get(function_of(binary), set())
        denied = sorted(
            (action, resource)
            for action, resource in calls
            if not any(action == a and fnmatch.fnmatchcase(resource, r) for a, r in allowed)
        )
        if denied:
            print(f"FAIL  {binary}: template.yaml does not grant {function_of(binary)} {denied}")
            c.failures.append(f"{binary} grants")
        elif args.verbose:
            print(f"calls {binary}: {sorted(calls)}")
    if not any(f.endswith(" grants") for f in c.failures):
        print(f"ok    grants: template.yaml grants each of {len(c.calls)} functions every AWS call it made")

    every = {name[: -len(".json")] for name in os.listdir(os.path.join(ROOT, "events")) if name.endswith(".json")}
    if c.invoked != every:
        print(f"FAIL  not invoked: {sorted(every - c.invoked)}")
        c.failures.append("coverage")
    if c.failures:
        sys.exit(f"lambda invoke check: {len(c.failures)} failed: {', '.join(c.failures)}")
    print(f"lambda invoke check: all {len(c.invoked)} functions answered as their events ask")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("provision")
    p.add_argument("--template", required=True, help="template.yaml as courier-template prints it")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--recorder", required=True, help="courier-recorder: the functions' AWS and @connections endpoint")
    p.add_argument("--env-file", required=True)
    p.add_argument("--names-file", required=True)
    p = sub.add_parser("run")
    p.add_argument("--template", required=True, help="template.yaml as courier-template prints it")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--names-file", required=True)
    p.add_argument("--recorder", required=True)
    p.add_argument("--calls", required=True, help="courier-recorder's log")
    p.add_argument("--invoke-port", type=int, required=True)
    p.add_argument("--verbose", action="store_true", help="print each function's AWS calls")
    p.add_argument("--work", required=True)
    args = parser.parse_args()
    {"provision": provision, "run": run}[args.command](args)


if __name__ == "__main__":
    main()
