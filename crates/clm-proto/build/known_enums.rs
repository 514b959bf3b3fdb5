//! Generates `impl KnownEnums` for every message of the CLM packages (and
//! the vendored google.longrunning / google.rpc ones): a walk that reports
//! each enum field holding a number its enum does not define, with the
//! field's proto path. Proto3 keeps unknown enum numbers as plain `i32`s,
//! so without this a hostile or newer client's value would reach handlers
//! as if it meant something.

use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FileDescriptorSet};
use std::collections::HashMap;
use std::fmt::Write;

/// The Rust module path of a proto package (`clm.customer.v1` →
/// `crate::clm::customer::v1`), or `None` for packages not walked.
fn module(package: &str) -> Option<String> {
    let walked =
        package.starts_with("clm.") || package == "google.longrunning" || package == "google.rpc";
    walked.then(|| format!("crate::{}", package.replace('.', "::")))
}

/// prost's snake_case of a message name (module of its nested types).
fn snake(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let prev_lower =
                i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if i > 0 && (prev_lower || (chars[i - 1].is_uppercase() && next_lower)) {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(*c);
        }
    }
    escape(out)
}

/// prost's UpperCamelCase of a field or oneof name.
fn camel(name: &str) -> String {
    name.split('_')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let mut c = p.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

/// A field or module name as prost writes it (raw identifiers for keywords).
fn escape(name: String) -> String {
    const KEYWORDS: [&str; 44] = [
        "as", "break", "const", "continue", "else", "enum", "extern", "false", "fn", "for", "if",
        "impl", "in", "let", "loop", "match", "mod", "move", "mut", "pub", "ref", "return",
        "static", "struct", "trait", "true", "type", "unsafe", "use", "where", "while", "async",
        "await", "dyn", "abstract", "become", "box", "do", "final", "macro", "override", "priv",
        "typeof", "yield",
    ];
    if KEYWORDS.contains(&name.as_str())
        || ["try", "gen", "unsized", "virtual"].contains(&name.as_str())
    {
        format!("r#{name}")
    } else {
        name
    }
}

/// What is known of every message and enum: Rust path by full proto name.
#[derive(Default)]
struct Types {
    messages: HashMap<String, (String, DescriptorProto)>,
    enums: HashMap<String, String>,
}

impl Types {
    fn add(&mut self, proto_prefix: &str, rust_prefix: &str, m: &DescriptorProto) {
        let name = m.name();
        let full = format!("{proto_prefix}.{name}");
        let rust = format!("{rust_prefix}::{name}");
        let nested = format!("{rust_prefix}::{}", snake(name));
        for e in &m.enum_type {
            self.enums.insert(
                format!("{full}.{}", e.name()),
                format!("{nested}::{}", e.name()),
            );
        }
        for n in &m.nested_type {
            self.add(&full, &nested, n);
        }
        self.messages.insert(full, (rust, m.clone()));
    }
}

/// The generated code.
pub fn generate(set: &FileDescriptorSet) -> String {
    let mut types = Types::default();
    for f in &set.file {
        let Some(module) = module(f.package()) else {
            continue;
        };
        let prefix = format!(".{}", f.package());
        for e in &f.enum_type {
            types.enums.insert(
                format!("{prefix}.{}", e.name()),
                format!("{module}::{}", e.name()),
            );
        }
        for m in &f.message_type {
            types.add(&prefix, &module, m);
        }
    }
    let mut names: Vec<&String> = types.messages.keys().collect();
    names.sort();
    let mut out = String::new();
    for full in names {
        let (rust, m) = &types.messages[full];
        if m.options.as_ref().is_some_and(|o| o.map_entry()) {
            continue;
        }
        let mut body = String::new();
        for f in &m.field {
            field(&types, rust, m, f, &mut body);
        }
        let used = if body.is_empty() { "_" } else { "" };
        let _ = writeln!(
            out,
            "impl crate::KnownEnums for {rust} {{\n    #[allow(unused_variables)]\n    fn unknown_enums(&self, {used}at: &dyn Fn() -> String, {used}out: &mut Vec<crate::UnknownEnum>) {{\n{body}    }}\n}}\n"
        );
    }
    out
}

/// The check of one field: an enum value, or the walk into a message.
fn field(
    types: &Types,
    rust: &str,
    m: &DescriptorProto,
    f: &prost_types::FieldDescriptorProto,
    body: &mut String,
) {
    let name = f.name();
    let ident = escape(name.to_owned());
    let path = format!("crate::join(at, {name:?})");
    let repeated = f.label() == Label::Repeated;
    let enum_path = (f.r#type() == Type::Enum)
        .then(|| types.enums.get(f.type_name()).cloned())
        .flatten();
    let message = (f.r#type() == Type::Message)
        .then(|| types.messages.get(f.type_name()))
        .flatten();
    if enum_path.is_none() && message.is_none() {
        return;
    }
    // A map: walk its values.
    if let Some((_, entry)) = message
        && entry.options.as_ref().is_some_and(|o| o.map_entry())
    {
        let Some(value) = entry.field.iter().find(|v| v.number() == 2) else {
            return;
        };
        let check = match (value.r#type(), types.enums.get(value.type_name())) {
            (Type::Enum, Some(e)) => format!(
                "if {e}::try_from(*v).is_err() {{ out.push(crate::UnknownEnum::new(crate::key(&|| {path}, k), *v, {e:?})); }}"
            ),
            (Type::Message, _) if types.messages.contains_key(value.type_name()) => {
                format!("v.unknown_enums(&|| crate::key(&|| {path}, k), out);")
            }
            _ => return,
        };
        let _ = writeln!(body, "        for (k, v) in &self.{ident} {{ {check} }}");
        return;
    }
    let enum_name = f.type_name().trim_start_matches('.').to_owned();
    let check_value = |value: &str, at: &str| match &enum_path {
        Some(e) => format!(
            "if {e}::try_from({value}).is_err() {{ out.push(crate::UnknownEnum::new({at}, {value}, {enum_name:?})); }}"
        ),
        None => format!("{value}.unknown_enums(&|| {at}, out);"),
    };
    if let Some(oneof) = f.oneof_index.filter(|_| !f.proto3_optional()) {
        let oneof = &m.oneof_decl[oneof as usize];
        let (module, msg) = rust.rsplit_once("::").unwrap_or(("crate", rust));
        let enum_ty = format!("{module}::{}::{}", snake(msg), camel(oneof.name()));
        let value = if enum_path.is_some() { "*v" } else { "v" };
        let _ = writeln!(
            body,
            "        if let Some({enum_ty}::{}(v)) = &self.{} {{ {} }}",
            camel(name),
            escape(oneof.name().to_owned()),
            check_value(value, &path)
        );
        return;
    }
    if repeated {
        let value = if enum_path.is_some() { "*v" } else { "v" };
        let at = format!("crate::index(&|| {path}, i)");
        let _ = writeln!(
            body,
            "        for (i, v) in self.{ident}.iter().enumerate() {{ {} }}",
            check_value(value, &at)
        );
    } else if f.proto3_optional() || message.is_some() {
        let value = if enum_path.is_some() { "*v" } else { "v" };
        let _ = writeln!(
            body,
            "        if let Some(v) = &self.{ident} {{ {} }}",
            check_value(value, &path)
        );
    } else {
        let _ = writeln!(
            body,
            "        {}",
            check_value(&format!("self.{ident}"), &path)
        );
    }
}
