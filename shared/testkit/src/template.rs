//! The one reader of template.yaml: the template tests use it, and
//! scripts/lambda-invoke-check reads its JSON (the `courier-template` binary).

use std::path::{Path, PathBuf};

use saphyr::{LoadableYamlNode, Scalar, Yaml};
use serde_json::{Map, Value, json};

/// The workspace root, where template.yaml is.
pub fn root() -> PathBuf {
    let testkit = Path::new(env!("CARGO_MANIFEST_DIR"));
    testkit.ancestors().nth(2).expect("the test kit is shared/testkit").to_owned()
}

/// A YAML node as JSON, CloudFormation's short forms turned into long ones:
/// `!Ref X` is `{"Ref": "X"}`, `!GetAtt A.B` is `{"Fn::GetAtt": ["A", "B"]}`,
/// `!Sub s` is `{"Fn::Sub": s}`, and so on.
fn to_json(node: &Yaml) -> Value {
    match node {
        Yaml::Value(Scalar::Null) | Yaml::BadValue | Yaml::Alias(_) => Value::Null,
        Yaml::Value(Scalar::Boolean(b)) => Value::Bool(*b),
        Yaml::Value(Scalar::Integer(i)) => json!(i),
        Yaml::Value(Scalar::FloatingPoint(f)) => json!(f.into_inner()),
        Yaml::Value(Scalar::String(s)) | Yaml::Representation(s, _, _) => Value::String(s.to_string()),
        Yaml::Sequence(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Mapping(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match to_json(k) {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Yaml::Tagged(tag, inner) => {
            let inner = to_json(inner);
            let (key, value) = match tag.suffix.as_str() {
                "Ref" => ("Ref".to_owned(), inner),
                "Condition" => ("Condition".to_owned(), inner),
                "GetAtt" => {
                    let parts = match &inner {
                        Value::String(s) => {
                            let (resource, attribute) =
                                s.split_once('.').expect("!GetAtt Resource.Attribute");
                            json!([resource, attribute])
                        }
                        _ => inner,
                    };
                    ("Fn::GetAtt".to_owned(), parts)
                }
                other => (format!("Fn::{other}"), inner),
            };
            Value::Object(Map::from_iter([(key, value)]))
        }
    }
}

/// A CloudFormation template as JSON, the way CloudFormation reads it.
#[derive(Clone, Debug)]
pub struct Template {
    pub doc: Value,
}

impl Template {
    /// The workspace's template.yaml.
    pub fn load() -> Template {
        let path = root().join("template.yaml");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Template::parse(&text)
    }

    pub fn parse(text: &str) -> Template {
        let docs = Yaml::load_from_str(text).expect("the template parses as YAML");
        assert_eq!(docs.len(), 1, "the template is one document");
        Template { doc: to_json(&docs[0]) }
    }

    pub fn resources(&self) -> &Map<String, Value> {
        self.doc["Resources"].as_object().expect("Resources")
    }

    pub fn resource(&self, id: &str) -> &Value {
        self.resources().get(id).unwrap_or_else(|| panic!("the template has no resource {id}"))
    }

    pub fn of_type(&self, kind: &str) -> Vec<(&str, &Value)> {
        self.resources().iter().filter(|(_, r)| r["Type"] == kind).map(|(id, r)| (id.as_str(), r)).collect()
    }

    /// What SAM's `Globals: Function:` gives every function.
    pub fn globals(&self) -> &Value {
        &self.doc["Globals"]["Function"]
    }

    /// A function property, from the function or else from Globals.
    pub fn function_property(&self, id: &str, name: &str) -> Value {
        let own = &self.resource(id)["Properties"][name];
        if own.is_null() { self.globals()[name].clone() } else { own.clone() }
    }

    /// A function's environment: Globals' merged with its own.
    pub fn environment(&self, id: &str) -> Map<String, Value> {
        let mut env = self.globals()["Environment"]["Variables"].as_object().cloned().unwrap_or_default();
        if let Some(own) = self.resource(id)["Properties"]["Environment"]["Variables"].as_object() {
            env.extend(own.clone());
        }
        env
    }

    /// The statements of a function's inline policies.
    pub fn statements(&self, id: &str) -> Vec<Value> {
        let policies = self.resource(id)["Properties"]["Policies"].as_array().cloned().unwrap_or_default();
        policies.iter().flat_map(|p| p["Statement"].as_array().cloned().unwrap_or_default()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_forms_read_as_long_ones() {
        let t = Template::parse(
            "Resources:\n  Q:\n    Type: AWS::SQS::Queue\n    Properties:\n      \
             A: !Ref X\n      B: !GetAtt T.StreamArn\n      C: !Sub '${T}/index/*'\n      \
             D: !If [Cond, 1, !Ref AWS::NoValue]\n      E: 60\n      F: true\n",
        );
        let p = &t.resource("Q")["Properties"];
        assert_eq!(p["A"], json!({"Ref": "X"}));
        assert_eq!(p["B"], json!({"Fn::GetAtt": ["T", "StreamArn"]}));
        assert_eq!(p["C"], json!({"Fn::Sub": "${T}/index/*"}));
        assert_eq!(p["D"], json!({"Fn::If": ["Cond", 1, {"Ref": "AWS::NoValue"}]}));
        assert_eq!((p["E"].clone(), p["F"].clone()), (json!(60), json!(true)));
        assert_eq!(t.of_type("AWS::SQS::Queue").len(), 1);
    }
}
