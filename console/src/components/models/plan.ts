// What a model upload sends: the files chosen (a folder, loose files, or one archive) turned
// into paths inside the model folder, a default model name, and the registration body. The
// rules for names and versions are the node's (store/src/repo/models.rs).
import type { ModelFileRef, RegisterModelBody } from '../../api/types'

/** An archive of a model folder the node unpacks itself. */
const ARCHIVE = /\.(tar\.gz|tgz|tar|zip)$/i
/** Extensions a default name drops: archives first, so `x.tar.gz` loses both parts. */
const NAME_SUFFIX = /\.(tar\.gz|tgz|tar|zip|gguf|safetensors|bin)$/i

export function isArchive(filename: string): boolean {
  return ARCHIVE.test(filename)
}

/** Files a model never needs: hidden ones (`.DS_Store`, anything under `.git/`) and macOS archive debris. */
export function isSkipped(path: string): boolean {
  return path.split('/').some((part) => part.startsWith('.') || part === '__MACOSX' || part === 'Thumbs.db' || part === 'desktop.ini')
}

/** A file's path in the model: a folder's files lose the folder's own name (`tiny/config.json` → `config.json`). */
export function modelPath(file: Pick<File, 'name' | 'webkitRelativePath'>): string {
  const relative = file.webkitRelativePath || ''
  const slash = relative.indexOf('/')
  return slash >= 0 ? relative.slice(slash + 1) : file.name
}

/** The folder a folder's files came from (`tiny/config.json` → `tiny`), or '' for loose files. */
export function folderName(file: Pick<File, 'webkitRelativePath'>): string {
  const relative = file.webkitRelativePath || ''
  const slash = relative.indexOf('/')
  return slash > 0 ? relative.slice(0, slash) : ''
}

/** A model name from a folder or file name: lowercase, other characters as `-`, no extension. */
export function suggestName(source: string): string {
  return source
    .replace(NAME_SUFFIX, '')
    .toLowerCase()
    .replace(/[^a-z0-9._-]+/g, '-')
    .replace(/-{2,}/g, '-')
    .replace(/\.{2,}/g, '.')
    .replace(/^[-._]+|[-._]+$/g, '')
    .slice(0, 128)
}

/** The node's rule: 1 to 128 letters, digits, `.`, `-`, `_` or `/`, not starting with `/` or `.`, no `//` or `..`. */
export function isValidName(name: string): boolean {
  return /^[A-Za-z0-9._/-]{1,128}$/.test(name) && !/^[/.]/.test(name) && !name.includes('//') && !name.includes('..')
}

/** The node's rule: 1 to 64 letters, digits, `.`, `-` or `_`, and not `latest`. */
export function isValidVersion(version: string): boolean {
  return /^[A-Za-z0-9._-]{1,64}$/.test(version) && version !== 'latest'
}

export interface PlannedFile {
  file: File
  /** The path in the model folder. */
  path: string
}

/** What to upload: files with their paths (registered as `files`), or one archive (registered as `archive_sha256`). */
export type UploadPlan =
  | { kind: 'files'; files: PlannedFile[]; folder: string; suggestedName: string; skipped: number }
  | { kind: 'archive'; archive: File; suggestedName: string; skipped: number }
  | { kind: 'invalid'; reason: 'empty' | 'archiveWithOthers'; skipped: number }

/**
 * Reads a choice of files: one archive alone is sent as an archive; anything else as the
 * model's files (hidden files left out). An archive among other files is refused: the node
 * would take it for a model file.
 */
export function planUpload(chosen: readonly File[]): UploadPlan {
  const files: PlannedFile[] = []
  let skipped = 0
  for (const file of chosen) {
    const path = modelPath(file)
    if (isSkipped(path)) skipped += 1
    else files.push({ file, path })
  }
  if (files.length === 0) return { kind: 'invalid', reason: 'empty', skipped }
  const folder = folderName(files[0]!.file)
  if (!folder) {
    const archives = files.filter((f) => isArchive(f.path))
    if (archives.length === 1 && files.length === 1) {
      return { kind: 'archive', archive: files[0]!.file, suggestedName: suggestName(files[0]!.path), skipped }
    }
    if (archives.length > 0) return { kind: 'invalid', reason: 'archiveWithOthers', skipped }
  }
  files.sort((a, b) => a.path.localeCompare(b.path))
  // A folder names the model; so does a single file (a .gguf); loose files name nothing.
  const suggestedName = folder ? suggestName(folder) : files.length === 1 ? suggestName(files[0]!.path) : ''
  return { kind: 'files', files, folder, suggestedName, skipped }
}

export interface RegisterFields {
  name: string
  version?: string
  description?: string
}

/** What was uploaded: each file's blob with its path, or the archive's blob. */
export type Uploaded = { kind: 'files'; files: ModelFileRef[] } | { kind: 'archive'; sha256: string }

/** The body of POST /v1/registry/models; an empty version or description is left to the node. */
export function registerBody(fields: RegisterFields, uploaded: Uploaded): RegisterModelBody {
  const body: RegisterModelBody = { name: fields.name.trim() }
  const version = fields.version?.trim()
  const description = fields.description?.trim()
  if (version) body.version = version
  if (description) body.description = description
  if (uploaded.kind === 'archive') body.archive_sha256 = uploaded.sha256
  else body.files = uploaded.files.map(({ path, sha256, size_bytes }) => ({ path, sha256, size_bytes }))
  return body
}

/** Whole percent of `sent` out of `total` bytes (an empty upload is complete once done). */
export function percentOf(sent: number, total: number, done = false): number {
  if (total <= 0) return done ? 100 : 0
  return Math.max(0, Math.min(100, Math.floor((sent / total) * 100)))
}
