//! Sentence embeddings: unit length, deterministic, the same in a batch as alone; on a
//! tiny random BERT always, and on the real all-MiniLM-L6-v2 when `MAAS_TEST_MINILM_DIR`
//! points at its folder (config.json, model.safetensors, tokenizer.json).

use std::path::PathBuf;

use maas_engine::EmbeddingModel;
use maas_engine::embeddings::Pooling;
use maas_engine::tiny::{TinyBertShape, write_bert};

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn texts() -> Vec<String> {
    [
        "hello world",
        "what is the answer to the question?",
        "a",
        "the tiny random model is not a model, it is random and tiny and answers no question",
        "where, when, who and why",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[test]
fn tiny_bert_embeddings_are_unit_deterministic_and_batch_independent() {
    let dir = tempfile::tempdir().unwrap();
    write_bert(dir.path(), TinyBertShape::default(), 8).unwrap();
    let model = EmbeddingModel::load(dir.path()).unwrap();
    assert_eq!(model.dimensions(), 32);
    let texts = texts();
    let batch = model.embed(&texts).unwrap();
    assert_eq!(batch.len(), texts.len());
    for (text, embedding) in texts.iter().zip(&batch) {
        assert_eq!(embedding.len(), 32);
        assert!((dot(embedding, embedding).sqrt() - 1.0).abs() < 1e-5, "{text:?} is unit length");
        let alone = model.embed(std::slice::from_ref(text)).unwrap().remove(0);
        let diff = alone.iter().zip(embedding).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-5, "{text:?}: batched and alone differ by {diff}");
    }
    assert_eq!(model.embed(&texts).unwrap(), batch, "deterministic");
    assert!(dot(&batch[0], &batch[1]) < 0.9999, "different texts differ");
    // [CLS] hello world [SEP].
    assert_eq!(model.count_tokens("hello world").unwrap(), 4);
    assert!(model.embed(&[]).unwrap().is_empty());

    // Longer than the model's positions: truncated, not an error.
    let long = "hello ".repeat(500);
    assert_eq!(model.embed(&[long]).unwrap()[0].len(), 32);
}

#[test]
fn a_folder_without_a_bert_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    maas_engine::tiny::write_llama(dir.path(), maas_engine::tiny::TinyShape::default(), 1).unwrap();
    let error = EmbeddingModel::load(dir.path()).unwrap_err().to_string();
    assert!(error.contains("not a BERT config"), "{error}");
}

#[test]
fn all_minilm_l6_v2_gives_meaningful_similarities_when_present() {
    let Some(dir) = std::env::var_os("MAAS_TEST_MINILM_DIR").map(PathBuf::from) else {
        println!("MAAS_TEST_MINILM_DIR is not set: skipping the all-MiniLM-L6-v2 check (the tiny BERT test still ran)");
        return;
    };
    let model = EmbeddingModel::load(&dir).unwrap();
    assert_eq!(model.dimensions(), 384);
    let texts: Vec<String> = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "A cheetah is running behind its prey.",
    ]
    .map(str::to_owned)
    .to_vec();
    let vectors = model.embed(&texts).unwrap();
    for vector in &vectors {
        assert!((dot(vector, vector).sqrt() - 1.0).abs() < 1e-4);
    }
    let paraphrase = dot(&vectors[0], &vectors[1]);
    let unrelated = dot(&vectors[0], &vectors[2]);
    println!("all-MiniLM-L6-v2: paraphrase cosine {paraphrase:.3}, unrelated {unrelated:.3}");
    assert!(paraphrase > 0.6, "paraphrase cosine {paraphrase}");
    assert!(unrelated < 0.2, "unrelated cosine {unrelated}");
    let alone = model.embed(&texts[3..]).unwrap().remove(0);
    assert!(alone.iter().zip(&vectors[3]).all(|(a, b)| (a - b).abs() < 1e-4));
}

#[test]
fn the_sentence_transformers_pooling_config_picks_cls_or_mean() {
    let dir = tempfile::tempdir().unwrap();
    write_bert(dir.path(), TinyBertShape::default(), 8).unwrap();
    let mean = EmbeddingModel::load(dir.path()).unwrap();
    assert_eq!(mean.pooling(), Pooling::Mean, "no 1_Pooling/config.json: mean pooling");

    // bge's configuration: the [CLS] token's state.
    let pooling = dir.path().join("1_Pooling");
    std::fs::create_dir(&pooling).unwrap();
    let config = |json: &str| std::fs::write(pooling.join("config.json"), json).unwrap();
    config(r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#);
    let cls = EmbeddingModel::load(dir.path()).unwrap();
    assert_eq!(cls.pooling(), Pooling::Cls);
    let texts = texts();
    let (by_mean, by_cls) = (mean.embed(&texts).unwrap(), cls.embed(&texts).unwrap());
    for ((text, m), c) in texts.iter().zip(&by_mean).zip(&by_cls) {
        assert!((dot(c, c).sqrt() - 1.0).abs() < 1e-5, "{text:?} is unit length");
        let differ = m.iter().zip(c).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(differ > 1e-3, "{text:?}: CLS and mean pooling give different embeddings");
        let alone = cls.embed(std::slice::from_ref(text)).unwrap().remove(0);
        let diff = alone.iter().zip(c).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(diff < 1e-5, "{text:?}: padding in a batch does not reach the CLS state ({diff})");
    }

    // MiniLM's configuration is mean pooling; a mode the engine does not compute is named.
    config(r#"{"pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}"#);
    assert_eq!(EmbeddingModel::load(dir.path()).unwrap().pooling(), Pooling::Mean);
    config(r#"{"pooling_mode_max_tokens": true}"#);
    let error = EmbeddingModel::load(dir.path()).unwrap_err().to_string();
    assert!(error.contains("pooling_mode_max_tokens") && error.contains("not supported"), "{error}");
}
