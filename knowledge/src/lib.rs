//! Knowledge bases: document parsing, chunking, the vector-store trait with Milvus and
//! embedded backends, hybrid retrieval, and RAG prompts with citations.
//!
//! Empty until the knowledge-base work lands: nothing here runs yet.
//!
//! **Boundary:** uses `maas-engine` for embeddings; knows nothing about HTTP.
