//! Test-only: a valid component of another world (`export greet`), which the host must
//! refuse to load as a route policy.

wit_bindgen::generate!({
    inline: r#"
        package test:wrong-world;

        world other {
            export greet: func(name: string) -> string;
        }
    "#,
});

struct Other;

impl Guest for Other {
    fn greet(name: String) -> String {
        format!("hello {name}")
    }
}

export!(Other);
