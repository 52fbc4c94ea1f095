import { afterEach, describe, expect, it, vi } from 'vitest'
import { ApiError } from './client'
import { isAbort, sendWithProgress, uploadBlob } from './upload'
import { FakeXhr } from '../test/helpers'

afterEach(() => {
  vi.unstubAllGlobals()
  FakeXhr.reset()
})

const SHA = 'a'.repeat(64)

describe('uploading a blob', () => {
  it('sends the raw bytes with the session cookie, reports progress, and resolves with the digest', async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const seen: number[] = []
    const file = new File(['0123456789'], 'model.safetensors')
    const handle = uploadBlob(file, (fraction) => seen.push(fraction))
    const xhr = FakeXhr.last!
    expect(xhr.method).toBe('POST')
    expect(xhr.url).toBe('/v1/blobs')
    expect(xhr.withCredentials).toBe(true)
    expect(xhr.headers).toEqual({ accept: 'application/json', 'content-type': 'application/octet-stream' })
    // The file itself is the body: no multipart form around it.
    expect(xhr.body).toBe(file)
    xhr.progress(4, 10)
    xhr.upload.onprogress?.({ lengthComputable: false, loaded: 7, total: 0 } as ProgressEvent)
    xhr.progress(10, 10)
    xhr.answer(200, { sha256: SHA, size_bytes: 10 })
    await expect(handle.promise).resolves.toEqual({ sha256: SHA, size_bytes: 10 })
    expect(seen).toEqual([0.4, 1, 1])
  })

  it("turns the node's error into an ApiError (413: too large)", async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const handle = uploadBlob(new Blob(['x']), () => undefined)
    FakeXhr.last!.answer(413, { error: { message: 'the body is larger than 1 GiB', code: 'payload_too_large', param: null } })
    await expect(handle.promise).rejects.toMatchObject({ status: 413, code: 'payload_too_large', message: 'the body is larger than 1 GiB' })
  })

  it('rejects with an AbortError when aborted', async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const handle = uploadBlob(new Blob(['x']), () => undefined)
    handle.abort()
    expect(FakeXhr.last!.aborted).toBe(true)
    const caught = await handle.promise.catch((error: unknown) => error)
    expect(isAbort(caught)).toBe(true)
    expect(isAbort(new ApiError(0, 'network_error', 'network'))).toBe(false)
  })
})

describe('sending with progress', () => {
  it('uses the method, url and headers given', () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    void sendWithProgress('PUT', '/v1/things/1', new Blob(['x']), { 'x-test': 'yes' }, () => undefined).promise.catch(() => undefined)
    expect(FakeXhr.last).toMatchObject({ method: 'PUT', url: '/v1/things/1', headers: { accept: 'application/json', 'x-test': 'yes' } })
  })

  it('reads a missing answer as a network error and a non-JSON success as a bad answer', async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const lost = sendWithProgress('POST', '/v1/blobs', new Blob(['x']), {}, () => undefined)
    FakeXhr.last!.fail()
    await expect(lost.promise).rejects.toMatchObject({ status: 0, code: 'network_error' })
    const garbled = sendWithProgress('POST', '/v1/blobs', new Blob(['x']), {}, () => undefined)
    FakeXhr.last!.answer(200, '<html>')
    await expect(garbled.promise).rejects.toMatchObject({ status: 200, code: 'bad_response' })
  })

  it('keeps a proxy error page as a generic error with its status', async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const handle = sendWithProgress('POST', '/v1/blobs', new Blob(['x']), {}, () => undefined)
    FakeXhr.last!.statusText = 'Bad Gateway'
    FakeXhr.last!.answer(502, '<html>bad gateway</html>')
    await expect(handle.promise).rejects.toMatchObject({ status: 502, code: 'http_error', message: 'Bad Gateway' })
  })
})
