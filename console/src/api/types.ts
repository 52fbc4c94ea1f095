// Request and answer types. Where the node's OpenAPI document describes a shape, the type
// comes from the generated schema.d.ts; the answers the document only calls
// "application/json" are written here from the handlers (gateway/src/routes/*.rs) until the
// document describes them too.
import type { components } from './schema'

type Schemas = components['schemas']

export type SignUpBody = Schemas['SignUp']
export type SignInBody = Schemas['SignIn']
export type VerifyBody = Schemas['Verify']
export type CodeRequestBody = Schemas['CodeRequest']
export type ResetPasswordBody = Schemas['ResetPassword']
export type ChangePasswordBody = Schemas['ChangePassword']
export type CreateKeyBody = Schemas['CreateKey']
export type DeploymentRequest = Schemas['DeploymentRequest']
export type DeploymentView = Schemas['DeploymentView']
export type DeploymentList = Schemas['DeploymentList']
export type ReplicaView = Schemas['ReplicaView']
export type EstimateRequest = Schemas['EstimateRequest']
export type EstimateReply = Schemas['EstimateReply']
export type DeploymentMetrics = Schemas['DeploymentMetrics']
export type MetricsPoint = Schemas['MetricsPoint']
export type DeploymentLogs = Schemas['DeploymentLogs']
export type LogLine = Schemas['LogLine']
export type LogLevel = Schemas['LogLevel']
export type ClusterStatus = Schemas['ClusterStatus']
export type NodeList = Schemas['NodeList']
export type NodeView = Schemas['NodeView']
export type GpuList = Schemas['GpuList']
export type ClusterGpu = Schemas['ClusterGpu']
export type BlobReply = Schemas['BlobReply']

export interface List<T> {
  object: 'list'
  data: T[]
}

// ---- accounts, keys, usage and administration (from the OpenAPI document) ----------------
export type User = Schemas['User']
export type Org = Schemas['Org']
export type Me = Schemas['Me']
export type SignUpReply = Schemas['SignUpReply']
export type SignInReply = Schemas['SignInReply']
export type SessionInfo = Schemas['SessionInfo']

export type OAuthProvider = Schemas['ProviderView']

export type KeyScope = Schemas['KeyScope']
export type ApiKey = Schemas['KeyObject']
export type UsageSums = Schemas['UsageSums']
export type UsageSummary = Schemas['UsageSummary']

export type QuotaLimits = Schemas['QuotaLimits']
export type QuotaUsage = Schemas['QuotaUsage']
export type QuotaStatus = Schemas['QuotaStatus']
export type SubjectQuota = Schemas['SubjectQuota']

export type Price = Schemas['Price']
export type ModelPrice = Schemas['ModelPrice']
export type AuditEntry = Schemas['AuditEntry']
export type OutboxMessage = Schemas['OutboxMessage']

export type OpenAiModel = Schemas['ModelObject']

export type OrgMember = Schemas['Member']

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant'
  content: string
}

export type ModelVersion = Schemas['ModelVersionRecord']

/** A file of a model version: an uploaded blob and its path in the model folder. */
export type ModelFileRef = Schemas['ModelFile']

/** POST /v1/registry/models: a version from uploaded blobs (`files`) or from one uploaded archive (`archive_sha256`). */
export type RegisterModelBody = Schemas['RegisterRequest']

export interface CatalogModel {
  name: string
  display_name: string
  family: string
  publisher: string
  source_repo: string
  format: string
  parameters: number
  context_length: number
  tasks: string[]
  servable: boolean
  not_servable_reason: string | null
  description: string
  imported_versions: string[]
}

export type Identity = Schemas['Identity']

// ---- knowledge bases (gateway/src/routes/knowledge.rs) -----------------------------------
// From the OpenAPI document, but for what it types as free JSON (`settings`,
// `chunking`) or as a plain string (a document's `state`): those shapes are here.

export type KnowledgeBase = Omit<Schemas['KnowledgeBaseObject'], 'settings'> & {
  settings: KnowledgeBaseSettings
}
export type KnowledgeBaseStats = Schemas['KnowledgeBaseStats']
export type KnowledgeShard = Schemas['ShardPlacementView']
export type KnowledgeDocument = Omit<Schemas['DocumentObject'], 'state'> & { state: DocumentState }
export type RetrievalMode = Schemas['RetrievalMode']
export type RetrieveBody = Schemas['RetrieveRequest']
export type RetrievedChunk = Schemas['RetrievedChunk']
export type RetrieveReply = Schemas['RetrieveResponse']

export interface ChunkingSettings {
  max_tokens: number
  overlap_tokens: number
  parent_max_tokens: number
  respect_headings: boolean
}

export interface KnowledgeBaseSettings {
  chunking?: Partial<ChunkingSettings>
  retrieval?: Partial<Schemas['RetrievalSettings']>
  graph?: Schemas['GraphSettings']
}

export interface CreateKnowledgeBaseBody {
  name: string
  description?: string
  embedding_model: string
  vector_backend?: 'embedded' | 'milvus'
  shards?: number
  chunking?: ChunkingSettings
  retrieval?: { multilingual: boolean }
}

export type DocumentState = 'queued' | 'parsing' | 'chunking' | 'embedding' | 'indexed' | 'failed' | 'retired' | 'deleting'

export interface KnowledgeChunk {
  chunk_id: string
  level: 'child' | 'parent'
  ordinal: number
  parent_ordinal: number | null
  text: string
  tokens: number
  page_start: number
  page_end: number
  heading_path: string[]
  embedded: boolean
  document_id?: string
}

export interface ChunkPage {
  data: KnowledgeChunk[]
  total: number
}

export interface GraphEntity {
  key: string
  name: string
  kind: string
  mentions: number
  documents: number
}

export interface GraphRelation {
  source: string
  target: string
  weight: number
  evidence: string
}

export interface KnowledgeGraph {
  entities: GraphEntity[]
  relations: GraphRelation[]
}

export interface EntityNeighbourhood {
  entity: string
  relations: GraphRelation[]
  chunks: KnowledgeChunk[]
}

export interface Citation {
  index: number
  knowledge_base_id: string
  document_id: string
  filename: string
  version: number
  page_start: number
  page_end: number
  heading_path: string[]
  chunk_id: string
  score: number
  text: string
}
