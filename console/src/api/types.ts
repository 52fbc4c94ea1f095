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

export interface User {
  id: string
  email: string | null
  phone: string | null
  display_name: string
  role: 'admin' | 'enterprise' | 'user'
  status: 'active' | 'pending' | 'disabled'
  created_at_ms: number
}

export interface Org {
  id: string
  name: string
  display_name: string
  created_at_ms: number
}

export interface Me {
  user: User
  acting_as: unknown
  orgs: Org[]
  credential: { kind: string; session_id?: string }
}

export interface SignUpReply {
  user: User
  verification_required: boolean
  next: string
}

export interface SignInReply {
  token: string
  session_id: string
  expires_at: number
  user: User
}

export interface SessionInfo {
  id: string
  address: string
  user_agent: string
  created_at_ms: number
  expires_at_ms: number
  revoked: boolean
}

export interface OAuthProvider {
  name: string
  kind: string
  display_name: string
  start_url: string
}

export type KeyScope = 'inference' | 'read_only' | 'admin'

export interface ApiKey {
  id: string
  object: 'api_key'
  name: string
  prefix: string
  scopes: KeyScope[]
  allowed_models: string[]
  created_at: number
  expires_at: number | null
  last_used_at: number | null
  revoked_at: number | null
  status: 'active' | 'revoked' | 'expired'
  /** Only in the answer to creating the key. */
  key?: string
}

export interface UsageSums {
  requests: number
  prompt_tokens: number
  completion_tokens: number
  cost_micros: number
}

export interface UsageSummary {
  data: Array<UsageSums & { day: string; model: string; key_id: string | null }>
  by_model: Array<UsageSums & { model: string }>
  by_day: Array<UsageSums & { day: string }>
  total: UsageSums
  storage_by_day: Array<{ day: string; max_bytes: number }>
}

export type QuotaLimits = Record<string, number>

export interface QuotaStatus {
  data: Array<{ subject: unknown; limits: QuotaLimits; used: Record<string, number> }>
  stored_bytes: number
}

export interface Price {
  input_per_1k_micros: number
  output_per_1k_micros: number
  gpu_hour_micros: number
}

export interface AuditEntry {
  id: string
  at_ms: number
  actor_user_id: string | null
  actor_key_id: string | null
  address: string
  action: string
  target: string
  detail: unknown
}

export interface OutboxMessage {
  id: string
  channel: string
  recipient: string
  subject: string
  body: string
  created_at_ms: number
  sent_at_ms: number | null
  error: string | null
}

export type OpenAiModel = Schemas['ModelObject']

export interface OrgMember {
  user_id: string
  display_name: string
  email: string | null
  org_role: 'owner' | 'admin' | 'member'
  joined_at_ms: number
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant'
  content: string
}

export interface ModelVersion {
  id: string
  model_id: string
  name: string
  owner_kind: string
  owner_id: string
  description: string
  version: string
  format: string
  architecture: string
  parameters: number
  context_length: number
  dtype: string
  quantization: string
  tasks: string[]
  total_bytes: number
  created_at_ms: number
}

/** A file of a model version: an uploaded blob and its path in the model folder. */
export interface ModelFileRef {
  path: string
  sha256: string
  size_bytes: number
}

/**
 * POST /v1/registry/models: a version from uploaded blobs (`files`) or from one uploaded
 * archive (`archive_sha256`). The OpenAPI document types `files` as free objects.
 */
export type RegisterModelBody = Omit<Schemas['RegisterRequest'], 'files'> & { files?: ModelFileRef[] }

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

export interface Identity {
  provider: string
  subject: string
  email: string | null
  created_at_ms: number
  last_sign_in_at_ms: number
}

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
