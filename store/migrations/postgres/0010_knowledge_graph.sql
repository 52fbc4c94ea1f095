-- The knowledge graph: entities mentioned in each chunk and relations between entities
-- found in one sentence. Rows belong to a document version (deleted with it); queries
-- count only documents in state 'indexed', so a retired version drops out of the graph
-- when its successor is indexed.

CREATE TABLE kb_graph_mentions (
    kb_id        TEXT NOT NULL REFERENCES knowledge_bases (id) ON DELETE CASCADE,
    document_id  TEXT NOT NULL REFERENCES kb_documents (id) ON DELETE CASCADE,
    chunk_id     BIGINT NOT NULL,
    entity_key   TEXT NOT NULL,
    name         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    PRIMARY KEY (chunk_id, entity_key)
);
CREATE INDEX kb_graph_mentions_entity ON kb_graph_mentions (kb_id, entity_key);
CREATE INDEX kb_graph_mentions_document ON kb_graph_mentions (document_id);

CREATE TABLE kb_graph_relations (
    kb_id        TEXT NOT NULL REFERENCES knowledge_bases (id) ON DELETE CASCADE,
    document_id  TEXT NOT NULL REFERENCES kb_documents (id) ON DELETE CASCADE,
    chunk_id     BIGINT NOT NULL,
    source_key   TEXT NOT NULL,
    target_key   TEXT NOT NULL,
    evidence     TEXT NOT NULL,
    PRIMARY KEY (chunk_id, source_key, target_key)
);
CREATE INDEX kb_graph_relations_source ON kb_graph_relations (kb_id, source_key);
CREATE INDEX kb_graph_relations_target ON kb_graph_relations (kb_id, target_key);
CREATE INDEX kb_graph_relations_document ON kb_graph_relations (document_id);
