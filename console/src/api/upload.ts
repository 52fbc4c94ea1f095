// Uploads a document to a knowledge base: a multipart form sent with XMLHttpRequest, whose
// upload events report progress (fetch reports none).
import { ApiError } from './client'
import type { KnowledgeDocument } from './types'

export interface UploadFields {
  file: File | Blob
  filename?: string
  /** A comma-separated list (or a JSON array) of tags. */
  tags?: string
  category?: string
}

export interface UploadHandle {
  promise: Promise<KnowledgeDocument>
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

/** Sends the form; `onProgress` gets the fraction (0..1) of the body sent so far. */
export function uploadDocument(kbId: string, fields: UploadFields, onProgress: (fraction: number) => void): UploadHandle {
  const xhr = new XMLHttpRequest()
  const promise = new Promise<KnowledgeDocument>((resolve, reject) => {
    const form = new FormData()
    form.append('file', fields.file, fields.filename ?? (fields.file instanceof File ? fields.file.name : 'document'))
    if (fields.tags?.trim()) form.append('tags', fields.tags.trim())
    if (fields.category?.trim()) form.append('category', fields.category.trim())
    xhr.open('POST', `/v1/knowledge_bases/${encodeURIComponent(kbId)}/documents`)
    xhr.withCredentials = true
    xhr.setRequestHeader('accept', 'application/json')
    xhr.upload.onprogress = (event: ProgressEvent) => {
      if (event.lengthComputable && event.total > 0) onProgress(Math.min(1, event.loaded / event.total))
    }
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        onProgress(1)
        try {
          resolve(JSON.parse(xhr.responseText) as KnowledgeDocument)
        } catch {
          reject(new ApiError(xhr.status, 'bad_response', 'the answer is not JSON'))
        }
      } else {
        reject(errorFromText(xhr.status, xhr.statusText, xhr.responseText))
      }
    }
    xhr.onerror = () => reject(new ApiError(0, 'network_error', 'network'))
    xhr.onabort = () => reject(new DOMException('aborted', 'AbortError'))
    xhr.send(form)
  })
  return { promise, abort: () => xhr.abort() }
}
