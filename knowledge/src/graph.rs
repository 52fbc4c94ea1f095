//! The knowledge graph's deterministic extractor: entities and the relations between them,
//! per chunk, without a model.
//!
//! - **English** (and other Latin-script text): a run of capitalised words (`Fresnel
//!   Lens`, `Bank of England`: `of`, `de`, `la` may join two capitalised words) is a name;
//!   a word in capitals of 2 to 8 letters (`GPU`, `NASA`) is an acronym. A sentence's
//!   first word is capitalised by grammar, not meaning: it is a name only when it is not a
//!   common sentence opener (`The`, `When`, `This`...), which is also dropped from the
//!   front of a longer run (`The Fresnel Lens` is `Fresnel Lens`).
//! - **Chinese**: jieba's part-of-speech tags: person (`nr`), place (`ns`), organisation
//!   (`nt`) and other proper nouns (`nz`); and nouns (`n`) of three or more characters,
//!   which are mostly terms (`知识库`, `龙井茶`).
//! - **Relations**: two entities in one sentence are related (undirected, `source` <
//!   `target` by key), with the sentence as evidence. Their weight is how many sentences
//!   say so, summed by the store.
//!
//! Every entity has a `key` (lowercase, spaces collapsed) under which mentions in different
//! chunks and documents meet. The output is in order of appearance, without repeats, so
//! the same text always gives the same graph.
//!
//! A knowledge base may name a chat model to extract with instead: it is asked, per chunk,
//! with [`MODEL_INSTRUCTIONS`], and [`parse_model_answer`] turns its JSON answer into the
//! same [`Extracted`] under the same bounds (a model's answer is untrusted input).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::fulltext::analyzer::{JIEBA, is_han};

/// Entities per sentence that relations are made between, at most (a list of names would
/// otherwise make a clique).
const MAX_RELATED_PER_SENTENCE: usize = 8;
/// The longest evidence kept, in characters.
const MAX_EVIDENCE_CHARS: usize = 300;
/// The longest entity name, in characters.
const MAX_NAME_CHARS: usize = 80;

/// What an entity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityKind {
    Person,
    Place,
    Organization,
    /// A capitalised name of unknown kind, or another proper noun.
    Name,
    Acronym,
    /// A multi-character noun (Chinese).
    Term,
}

impl EntityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntityKind::Person => "person",
            EntityKind::Place => "place",
            EntityKind::Organization => "organization",
            EntityKind::Name => "name",
            EntityKind::Acronym => "acronym",
            EntityKind::Term => "term",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entity {
    /// Where mentions meet: lowercase, whitespace collapsed.
    pub key: String,
    /// As first written.
    pub name: String,
    pub kind: EntityKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Relation {
    pub source: String,
    pub target: String,
    /// The sentence that relates them.
    pub evidence: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Extracted {
    pub entities: Vec<Entity>,
    pub relations: Vec<Relation>,
}

/// The key an entity name is stored and matched under.
pub fn entity_key(name: &str) -> String {
    name.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// The entities and relations of `text` (a chunk, or a query).
pub fn extract(text: &str) -> Extracted {
    let mut out = Extracted::default();
    let mut known = BTreeSet::new();
    let mut related = BTreeSet::new();
    for sentence in sentences(text) {
        let found = sentence_entities(sentence);
        let mut keys: Vec<String> = Vec::new();
        for entity in found {
            if !keys.contains(&entity.key) {
                keys.push(entity.key.clone());
            }
            if known.insert(entity.key.clone()) {
                out.entities.push(entity);
            }
        }
        keys.truncate(MAX_RELATED_PER_SENTENCE);
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                let (source, target) = if a < b { (a, b) } else { (b, a) };
                if related.insert((source.clone(), target.clone())) {
                    let evidence: String = sentence.trim().chars().take(MAX_EVIDENCE_CHARS).collect();
                    out.relations.push(Relation { source: source.clone(), target: target.clone(), evidence });
                }
            }
        }
    }
    out
}

/// What a chat model is told when it extracts a chunk's graph.
pub const MODEL_INSTRUCTIONS: &str = "Extract the named entities and the relations between them from the user's text. \
Answer with one JSON object and nothing else, of this shape: \
{\"entities\": [{\"name\": \"...\", \"kind\": \"person|place|organization|acronym|term|name\"}], \
\"relations\": [{\"source\": \"entity name\", \"target\": \"entity name\", \"evidence\": \"the words of the text that relate them\"}]}. \
Use names as the text writes them; relate only entities you listed.";

/// Entities and relations taken from one model answer, at most.
const MAX_MODEL_ENTITIES: usize = 32;
const MAX_MODEL_RELATIONS: usize = 64;

#[derive(Deserialize)]
struct ModelAnswer {
    #[serde(default)]
    entities: Vec<ModelEntity>,
    #[serde(default)]
    relations: Vec<ModelRelation>,
}

#[derive(Deserialize)]
struct ModelEntity {
    name: String,
    #[serde(default)]
    kind: String,
}

#[derive(Deserialize)]
struct ModelRelation {
    source: String,
    target: String,
    #[serde(default)]
    evidence: String,
}

/// The graph in a chat model's answer to [`MODEL_INSTRUCTIONS`]: the first JSON object in
/// it (text around it, a code fence, is ignored). Names are trimmed and bounded like the
/// deterministic extractor's, unknown kinds become `name`, repeats are dropped, and a
/// relation counts only between two listed entities (`source` < `target` by key, as
/// relations are undirected). `None` when the answer holds no such object, or no entity.
pub fn parse_model_answer(answer: &str) -> Option<Extracted> {
    let start = answer.find('{')?;
    let mut stream = serde_json::Deserializer::from_str(&answer[start..]).into_iter::<ModelAnswer>();
    let parsed = stream.next()?.ok()?;
    let mut out = Extracted::default();
    for entity in parsed.entities.into_iter().take(MAX_MODEL_ENTITIES) {
        push(&mut out.entities, &entity.name, model_kind(&entity.kind));
    }
    if out.entities.is_empty() {
        return None;
    }
    let mut related = BTreeSet::new();
    for relation in parsed.relations {
        let (a, b) = (entity_key(relation.source.trim()), entity_key(relation.target.trim()));
        let known = |key: &str| out.entities.iter().any(|e| e.key == key);
        if a == b || !known(&a) || !known(&b) {
            continue;
        }
        let (source, target) = if a < b { (a, b) } else { (b, a) };
        if related.insert((source.clone(), target.clone())) {
            let evidence: String = relation.evidence.trim().chars().take(MAX_EVIDENCE_CHARS).collect();
            out.relations.push(Relation { source, target, evidence });
        }
        if out.relations.len() == MAX_MODEL_RELATIONS {
            break;
        }
    }
    Some(out)
}

fn model_kind(kind: &str) -> EntityKind {
    match kind.trim().to_ascii_lowercase().as_str() {
        "person" | "people" | "per" => EntityKind::Person,
        "place" | "location" | "loc" | "gpe" | "country" | "city" => EntityKind::Place,
        "organization" | "organisation" | "org" | "company" | "institution" => EntityKind::Organization,
        "acronym" | "abbreviation" => EntityKind::Acronym,
        "term" | "concept" | "thing" | "object" => EntityKind::Term,
        _ => EntityKind::Name,
    }
}

/// Sentences: split after `.`, `!`, `?` followed by a space, after Chinese full stops,
/// and at line breaks.
fn sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let next = chars.peek().map(|(_, n)| *n);
        let ends = match c {
            '。' | '！' | '？' | '；' | '\n' => true,
            '.' | '!' | '?' => next.is_none_or(char::is_whitespace),
            _ => false,
        };
        if ends {
            let end = at + c.len_utf8();
            if !text[start..end].trim().is_empty() {
                out.push(&text[start..end]);
            }
            start = end;
        }
    }
    if !text[start..].trim().is_empty() {
        out.push(&text[start..]);
    }
    out
}

fn sentence_entities(sentence: &str) -> Vec<Entity> {
    let mut out = Vec::new();
    if sentence.chars().any(is_han) {
        for tag in JIEBA.tag(sentence, true) {
            let chars = tag.word.chars().count();
            let kind = match tag.tag {
                "nr" | "nrfg" | "nrt" => Some(EntityKind::Person),
                "ns" => Some(EntityKind::Place),
                "nt" => Some(EntityKind::Organization),
                "nz" => Some(EntityKind::Name),
                "n" if chars >= 3 => Some(EntityKind::Term),
                _ => None,
            };
            let hanzi = tag.word.chars().all(is_han);
            if let Some(kind) = kind.filter(|_| hanzi && chars >= 2) {
                push(&mut out, tag.word, kind);
            }
        }
    }
    latin_entities(sentence, &mut out);
    out
}

fn push(out: &mut Vec<Entity>, name: &str, kind: EntityKind) {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return;
    }
    let key = entity_key(name);
    if !out.iter().any(|e| e.key == key) {
        out.push(Entity { key, name: name.to_owned(), kind });
    }
}

/// Words that open sentences and are capitalised for that reason alone.
const OPENERS: &[&str] = &[
    "A", "About", "After", "All", "Also", "Although", "An", "And", "Any", "Are", "As", "At", "Be", "Because", "Before",
    "Both", "But", "By", "Can", "Do", "Does", "During", "Each", "Every", "For", "From", "He", "Her", "Here", "His",
    "How", "I", "If", "In", "Is", "It", "Its", "Many", "More", "Most", "My", "No", "Not", "Now", "Of", "On", "Once",
    "One", "Only", "Or", "Our", "Over", "She", "Since", "So", "Some", "Such", "That", "The", "Their", "Then", "There",
    "These", "They", "This", "Those", "Through", "To", "Under", "Unlike", "Until", "Was", "We", "Were", "What", "When",
    "Where", "Which", "While", "Who", "Why", "With", "Without", "Yes", "You", "Your",
];

/// Lowercase words that may join two capitalised words of one name.
const JOINERS: &[&str] = &["of", "de", "la", "von", "van", "del"];

fn latin_entities(sentence: &str, out: &mut Vec<Entity>) {
    // Words with their position in the sentence.
    let words: Vec<&str> = sentence
        .split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '-'))
        .map(|w| w.trim_matches(|c| c == '\'' || c == '-'))
        .filter(|w| !w.is_empty() && !w.chars().any(is_han))
        .collect();
    let capitalised = |w: &str| {
        let mut chars = w.chars();
        chars.next().is_some_and(char::is_uppercase) && w.chars().any(char::is_lowercase)
    };
    let acronym = |w: &str| {
        (2..=8).contains(&w.chars().count())
            && w.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            && w.chars().any(|c| c.is_ascii_uppercase())
    };
    let mut i = 0;
    while i < words.len() {
        if acronym(words[i]) {
            push(out, words[i], EntityKind::Acronym);
            i += 1;
            continue;
        }
        if !capitalised(words[i]) {
            i += 1;
            continue;
        }
        let start = i;
        let mut end = i + 1;
        while end < words.len() {
            if capitalised(words[end]) {
                end += 1;
            } else if JOINERS.contains(&words[end]) && end + 1 < words.len() && capitalised(words[end + 1]) {
                end += 2;
            } else {
                break;
            }
        }
        let mut run = &words[start..end];
        while let Some(first) = run.first() {
            if OPENERS.contains(first) {
                run = &run[1..];
            } else {
                break;
            }
        }
        if !run.is_empty() && !JOINERS.contains(&run[0]) {
            push(out, &run.join(" "), EntityKind::Name);
        }
        i = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(text: &str) -> Vec<String> {
        extract(text).entities.into_iter().map(|e| e.key).collect()
    }

    #[test]
    fn english_names_and_acronyms_are_found_and_openers_are_not() {
        let found = keys(
            "The Fresnel Lens was made in Paris. When fog comes, the keeper calls the Bank of England. NASA uses rockets.",
        );
        assert_eq!(found, ["fresnel lens", "paris", "bank of england", "nasa"]);
        assert!(keys("This is plain. It has no names at all.").is_empty());
    }

    #[test]
    fn chinese_proper_nouns_and_terms_are_found() {
        let extracted = extract("陆羽在杭州写了《茶经》。龙井茶产于西湖。");
        let names: Vec<&str> = extracted.entities.iter().map(|e| e.name.as_str()).collect();
        assert!(names.contains(&"杭州"), "{names:?}");
        assert!(names.contains(&"陆羽"), "{names:?}");
        let place = extracted.entities.iter().find(|e| e.name == "杭州").unwrap();
        assert_eq!(place.kind, EntityKind::Place);
    }

    #[test]
    fn entities_in_one_sentence_are_related_once_with_evidence() {
        let extracted =
            extract("Ada Lovelace worked with Charles Babbage in London. Ada Lovelace met Charles Babbage again.");
        let pairs: Vec<(&str, &str)> =
            extracted.relations.iter().map(|r| (r.source.as_str(), r.target.as_str())).collect();
        assert_eq!(
            pairs,
            [("ada lovelace", "charles babbage"), ("ada lovelace", "london"), ("charles babbage", "london")]
        );
        assert!(extracted.relations[0].evidence.starts_with("Ada Lovelace worked"));
    }

    #[test]
    fn a_models_answer_becomes_a_bounded_graph() {
        let answer = "Here is the graph:\n```json\n{\"entities\": [\
            {\"name\": \" Ada Lovelace \", \"kind\": \"PERSON\"}, {\"name\": \"Analytical Engine\", \"kind\": \"machine\"},\
            {\"name\": \"ada  lovelace\", \"kind\": \"person\"}, {\"name\": \"\"}, {\"name\": \"London\", \"kind\": \"city\"}],\
            \"relations\": [{\"source\": \"Analytical Engine\", \"target\": \"Ada Lovelace\", \"evidence\": \"she wrote its first program\"},\
            {\"source\": \"Ada Lovelace\", \"target\": \"analytical engine\"}, {\"source\": \"Ada Lovelace\", \"target\": \"Paris\"},\
            {\"source\": \"London\", \"target\": \"London\"}], \"extra\": 1}\n```\nDone.";
        let graph = parse_model_answer(answer).unwrap();
        let entities: Vec<(&str, &str, EntityKind)> =
            graph.entities.iter().map(|e| (e.key.as_str(), e.name.as_str(), e.kind)).collect();
        assert_eq!(
            entities,
            [
                ("ada lovelace", "Ada Lovelace", EntityKind::Person),
                ("analytical engine", "Analytical Engine", EntityKind::Name),
                ("london", "London", EntityKind::Place),
            ]
        );
        // One relation: the repeat, the unknown entity and the loop are dropped.
        assert_eq!(
            graph.relations,
            [Relation {
                source: "ada lovelace".into(),
                target: "analytical engine".into(),
                evidence: "she wrote its first program".into()
            }]
        );
        for useless in ["", "no graph here", "{\"entities\": []}", "{\"entities\": [{\"name\": 3}]}", "{broken"] {
            assert_eq!(parse_model_answer(useless), None, "{useless}");
        }
        let many = format!(
            "{{\"entities\": [{}]}}",
            (0..100).map(|i| format!("{{\"name\": \"E{i}\"}}")).collect::<Vec<_>>().join(",")
        );
        assert_eq!(parse_model_answer(&many).unwrap().entities.len(), MAX_MODEL_ENTITIES);
    }

    #[test]
    fn extraction_is_deterministic_and_bounded() {
        let text = "Alpha Beta met Gamma Delta. ".repeat(50);
        assert_eq!(extract(&text), extract(&text));
        let many = (0..20).map(|i| format!("Name{i}")).collect::<Vec<_>>().join(" and ") + " done.";
        let extracted = extract(&many);
        assert_eq!(extracted.entities.len(), 20);
        assert_eq!(extracted.relations.len(), MAX_RELATED_PER_SENTENCE * (MAX_RELATED_PER_SENTENCE - 1) / 2);
    }
}
