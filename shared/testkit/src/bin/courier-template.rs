//! Prints template.yaml as JSON, read by [`courier_testkit::template`]: how
//! scripts/lambda-invoke-check reads the template the template tests read.

fn main() {
    println!("{}", courier_testkit::template::Template::load().doc);
}
