// Uploads with progress: XMLHttpRequest, whose upload events report how much of the body
// has been sent (fetch reports none). Knowledge-base documents go as a multipart form; model
// files go as raw bytes to the blob store.
import { ApiError } from './client'
import type { BlobReply, KnowledgeDocument } from './types'

export interface UploadFields {
  file: File | Blob
  filename?: string
  /** A comma-separated list (or a JSON array) of tags. */
  tags?: string
  category?: string
}

/** A request in flight: its JSON answer, and a way to stop it (the promise then rejects with an AbortError). */
export interface UploadHandle<T = KnowledgeDocument> {
  promise: Promise<T>
  abort: () => void
}

/** Reads an OpenAI-shaped error body (`{error: {message, code, param}}`) from text. */
export function errorFromText(status: number, statusText: string, text: string): ApiError {
  try {
    const body = JSON.parse(text) as { error?: { message?: string; code?: string; param?: string | null } }
    if (body.error && typeof body.error.message === 'string') {
      return new ApiError(status, body.error.code ?? 'http_error', body.error.message, body.error.param ?? null)
    }
  } catch {
    // Not JSON.
  }
  return new ApiError(status, 'http_error', statusText || `HTTP ${status}`)
}

/**
 * Sends `body` with the session cookie and reads the JSON answer; `onProgress` gets the
 * fraction (0..1) of the body sent so far, and 1 once the node has answered. An error
 * answer rejects with an ApiError, no answer with a status-0 one, `abort()` with an
 * AbortError.
 */
export function sendWithProgress<T = unknown>(
  method: string,
  url: string,
  body: FormData | Blob,
  headers: Record<string, string>,
  onProgress: (fraction: number) => void,
): UploadHandle<T> {
  const xhr = new XMLHttpRequest()
  const promise = new Promise<T>((resolve, reject) => {
    xhr.open(method, url)
    xhr.withCredentials = true
    xhr.setRequestHeader('accept', 'application/json')
    for (const [name, value] of Object.entries(headers)) xhr.setRequestHeader(name, value)
    xhr.upload.onprogress = (event: ProgressEvent) => {
      if (event.lengthComputable && event.total > 0) onProgress(Math.min(1, event.loaded / event.total))
    }
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1)
        try {
          resolve(JSON.parse(xhr.responseText) as T)
        } catch {
          reject(new ApiError(xhr.status, 'bad_response', 'the answer is not JSON'))
        }
      } else {
        reject(errorFromText(xhr.status, xhr.statusText, xhr.responseText))
      }
    }
    xhr.onerror = () => reject(new ApiError(0, 'network_error', 'network'))
    xhr.onabort = () => reject(new DOMException('aborted', 'AbortError'))
    xhr.send(body)
  })
  return { promise, abort: () => xhr.abort() }
}

/** Sends a document to a knowledge base as a multipart form. */
export function uploadDocument(kbId: string, fields: UploadFields, onProgress: (fraction: number) => void): UploadHandle {
  const form = new FormData()
  form.append('file', fields.file, fields.filename ?? (fields.file instanceof File ? fields.file.name : 'document'))
  if (fields.tags?.trim()) form.append('tags', fields.tags.trim())
  if (fields.category?.trim()) form.append('category', fields.category.trim())
  return sendWithProgress<KnowledgeDocument>('POST', `/v1/knowledge_bases/${encodeURIComponent(kbId)}/documents`, form, {}, onProgress)
}

/** Stores a file's bytes in the node's blob store (administrators only); the answer names it by its sha256. */
export function uploadBlob(file: Blob, onProgress: (fraction: number) => void): UploadHandle<BlobReply> {
  return sendWithProgress<BlobReply>('POST', '/v1/blobs', file, { 'content-type': 'application/octet-stream' }, onProgress)
}

/** Whether an upload stopped because it was aborted. */
export function isAbort(error: unknown): boolean {
  return error instanceof DOMException && error.name === 'AbortError'
}
