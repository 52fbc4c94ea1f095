import { afterEach, describe, expect, it, vi } from 'vitest'
import { flushPromises, mount, type VueWrapper } from '@vue/test-utils'
import { ElMessage } from 'element-plus'
import ModelUpload from './ModelUpload.vue'
import Models from '../../views/Models.vue'
import {
  folderName,
  isArchive,
  isSkipped,
  isValidName,
  isValidVersion,
  modelPath,
  percentOf,
  planUpload,
  registerBody,
  suggestName,
} from './plan'
import { useSessionStore } from '../../stores/session'
import type { Me, ModelVersion } from '../../api/types'
import { deployableVersions, groupByModel } from './repository'
import { FakeXhr, json, plugins, stubFetch } from '../../test/helpers'

/** A file as a folder input gives it: `webkitRelativePath` starts with the folder's name. */
function inFolder(relative: string, content = 'x'): File {
  const file = new File([content], relative.split('/').pop()!)
  Object.defineProperty(file, 'webkitRelativePath', { value: relative })
  return file
}

const sha = (c: string) => c.repeat(64)

afterEach(() => {
  vi.unstubAllGlobals()
  vi.restoreAllMocks()
  FakeXhr.reset()
  document.body.innerHTML = ''
})

describe('paths and names', () => {
  it("gives a folder's files their path inside the folder, and loose files their name", () => {
    expect(modelPath(inFolder('tiny/config.json'))).toBe('config.json')
    expect(modelPath(inFolder('tiny/sub/dir/weights.safetensors'))).toBe('sub/dir/weights.safetensors')
    expect(modelPath(new File(['x'], 'model.gguf'))).toBe('model.gguf')
    expect(folderName(inFolder('Tiny Llama/config.json'))).toBe('Tiny Llama')
    expect(folderName(new File(['x'], 'model.gguf'))).toBe('')
  })

  it('skips hidden files and archive debris', () => {
    expect(isSkipped('.DS_Store')).toBe(true)
    expect(isSkipped('.git/objects/ab/cdef')).toBe(true)
    expect(isSkipped('sub/.hidden')).toBe(true)
    expect(isSkipped('__MACOSX/config.json')).toBe(true)
    expect(isSkipped('config.json')).toBe(false)
    expect(isSkipped('onnx/model.onnx')).toBe(false)
  })

  it('recognises archives', () => {
    for (const name of ['m.tar', 'm.tar.gz', 'M.TGZ', 'm.zip']) expect(isArchive(name), name).toBe(true)
    for (const name of ['m.gguf', 'm.gz', 'tar', 'model.safetensors']) expect(isArchive(name), name).toBe(false)
  })

  it('suggests a valid lowercase name from a folder or file name', () => {
    expect(suggestName('Qwen2.5-0.5B-Instruct')).toBe('qwen2.5-0.5b-instruct')
    expect(suggestName('My Model (copy)')).toBe('my-model-copy')
    expect(suggestName('tinyllama-1.1b-q4_k_m.gguf')).toBe('tinyllama-1.1b-q4_k_m')
    expect(suggestName('llama.tar.gz')).toBe('llama')
    expect(suggestName('.hidden..name--x.zip')).toBe('hidden.name-x')
    expect(suggestName('模型')).toBe('')
    expect(suggestName('x'.repeat(200))).toHaveLength(128)
    for (const source of ['Qwen2.5-0.5B-Instruct', 'My Model (copy)', '.hidden..name--x.zip']) {
      expect(isValidName(suggestName(source)), source).toBe(true)
    }
  })

  it("follows the node's rules for names and versions", () => {
    expect(isValidName('tiny-llama')).toBe(true)
    expect(isValidName('org/model_1.5')).toBe(true)
    for (const bad of ['', '.x', '/x', 'a//b', 'a..b', 'has space', 'ü', 'x'.repeat(129)]) expect(isValidName(bad), bad).toBe(false)
    expect(isValidVersion('v2')).toBe(true)
    expect(isValidVersion('2024.1-rc_1')).toBe(true)
    for (const bad of ['', 'latest', 'a/b', 'x'.repeat(65)]) expect(isValidVersion(bad), bad).toBe(false)
  })
})

describe('planning an upload', () => {
  it("sends a folder's files with their paths, sorted, hidden ones left out, named after the folder", () => {
    const plan = planUpload([
      inFolder('Tiny Llama/tokenizer.json'),
      inFolder('Tiny Llama/.DS_Store'),
      inFolder('Tiny Llama/.git/HEAD'),
      inFolder('Tiny Llama/config.json'),
      inFolder('Tiny Llama/model.safetensors'),
    ])
    expect(plan.kind).toBe('files')
    if (plan.kind !== 'files') return
    expect(plan.files.map((f) => f.path)).toEqual(['config.json', 'model.safetensors', 'tokenizer.json'])
    expect(plan.folder).toBe('Tiny Llama')
    expect(plan.suggestedName).toBe('tiny-llama')
    expect(plan.skipped).toBe(2)
  })

  it('sends one archive as an archive, named after it', () => {
    const plan = planUpload([new File(['x'], 'Phi-3.tar.gz')])
    expect(plan).toMatchObject({ kind: 'archive', suggestedName: 'phi-3', skipped: 0 })
  })

  it('sends a single .gguf as a file, and loose files without a name', () => {
    expect(planUpload([new File(['x'], 'Llama-Q8_0.gguf')])).toMatchObject({ kind: 'files', suggestedName: 'llama-q8_0', folder: '' })
    const loose = planUpload([new File(['{}'], 'config.json'), new File(['x'], 'model.safetensors')])
    expect(loose).toMatchObject({ kind: 'files', suggestedName: '' })
  })

  it('refuses an archive among other files, and a choice of hidden files only', () => {
    expect(planUpload([new File(['x'], 'm.zip'), new File(['{}'], 'config.json')])).toEqual({ kind: 'invalid', reason: 'archiveWithOthers', skipped: 0 })
    expect(planUpload([new File(['x'], 'a.zip'), new File(['x'], 'b.tar')])).toMatchObject({ kind: 'invalid', reason: 'archiveWithOthers' })
    expect(planUpload([inFolder('m/.DS_Store')])).toEqual({ kind: 'invalid', reason: 'empty', skipped: 1 })
    expect(planUpload([])).toMatchObject({ kind: 'invalid', reason: 'empty' })
  })

  it('builds the registration body for files and for an archive', () => {
    const files = [{ path: 'config.json', sha256: sha('a'), size_bytes: 2 }]
    expect(registerBody({ name: ' tiny ', version: ' ', description: '' }, { kind: 'files', files })).toEqual({ name: 'tiny', files })
    expect(registerBody({ name: 'tiny', version: 'v7', description: ' small ' }, { kind: 'archive', sha256: sha('b') })).toEqual({
      name: 'tiny',
      version: 'v7',
      description: 'small',
      archive_sha256: sha('b'),
    })
  })

  it('counts whole percents of the bytes sent', () => {
    expect(percentOf(0, 200)).toBe(0)
    expect(percentOf(199, 200)).toBe(99)
    expect(percentOf(200, 200)).toBe(100)
    expect(percentOf(0, 0)).toBe(0)
    expect(percentOf(0, 0, true)).toBe(100)
  })
})

// ---- the component ---------------------------------------------------------------------

function chooseFolder(wrapper: VueWrapper, files: File[]): Promise<void> {
  const input = wrapper.get<HTMLInputElement>('[data-test="model-folder"]')
  Object.defineProperty(input.element, 'files', { value: files, configurable: true })
  return input.trigger('change')
}

function mountUpload() {
  return mount(ModelUpload, { global: { plugins: plugins() }, attachTo: document.body })
}

const record = { name: 'tiny-llama', version: 'v1', format: 'safetensors' }

function fullVersion(name: string, owner_kind: string, owner_id: string, version: string): ModelVersion {
  return {
    id: `mv-${owner_kind}-${version}`,
    model_id: `model-${owner_kind}`,
    name,
    owner_kind,
    owner_id,
    description: '',
    version,
    format: 'safetensors',
    architecture: 'LlamaForCausalLM',
    parameters: 78272,
    context_length: 512,
    dtype: 'float32',
    quantization: 'none',
    tasks: ['chat'],
    config: {},
    files: [{ path: 'model.safetensors', sha256: 'ab'.repeat(32), size_bytes: 1000 }],
    total_bytes: 1000,
    created_at_ms: 1,
  }
}

describe('the model upload', () => {
  it('uploads each file with its progress, then registers the version and says so', async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const success = vi.spyOn(ElMessage, 'success')
    const { calls } = stubFetch({ 'POST /v1/registry/models': () => json(record, 201) })
    const wrapper = mountUpload()
    expect(wrapper.text()).toContain('No folder or files chosen yet')
    expect(wrapper.get('[data-test="model-upload-submit"]').attributes('disabled')).toBeDefined()

    // A suggested name follows the choice until one is typed in.
    await chooseFolder(wrapper, [inFolder('First/config.json')])
    expect((wrapper.get('[data-test="model-name"]').element as HTMLInputElement).value).toBe('first')
    await chooseFolder(wrapper, [inFolder('Tiny_Llama/config.json', '{"a":1}'), inFolder('Tiny_Llama/.DS_Store'), inFolder('Tiny_Llama/model.safetensors', 'x'.repeat(93))])
    expect((wrapper.get('[data-test="model-name"]').element as HTMLInputElement).value).toBe('tiny_llama')
    expect(wrapper.get('[data-test="model-upload-summary"]').text()).toContain('Folder Tiny_Llama · files: 2 · 100 B')
    expect(wrapper.get('[data-test="model-upload-summary"]').text()).toBe('Folder Tiny_Llama · files: 2 · 100 B · hidden files left out: 1')
    expect(wrapper.findAll('[data-test="model-upload-file"]').map((row) => row.find('.path').text())).toEqual(['config.json', 'model.safetensors'])
    await wrapper.get('[data-test="model-name"]').setValue('tiny-llama')

    await wrapper.get('form').trigger('submit')
    const first = FakeXhr.last!
    expect(FakeXhr.all).toHaveLength(1)
    expect(first.url).toBe('/v1/blobs')
    expect((first.body as File).name).toBe('config.json')
    expect(wrapper.find('[data-test="model-upload-cancel"]').exists()).toBe(true)
    first.progress(7, 7)
    first.answer(200, { sha256: sha('a'), size_bytes: 7 })
    await flushPromises()

    const second = FakeXhr.last!
    expect(FakeXhr.all).toHaveLength(2)
    expect((second.body as File).name).toBe('model.safetensors')
    second.progress(43, 93)
    await flushPromises()
    // 7 + 43 of 100 bytes.
    expect(wrapper.get('[data-test="model-upload-total"]').attributes('aria-valuenow')).toBe('50')
    expect(wrapper.get('[data-test="model-upload-total"]').attributes('aria-label')).toBe('Upload progress')
    const rows = wrapper.findAll('[data-test="model-upload-file"] [role="progressbar"]')
    expect(rows.map((row) => [row.attributes('aria-label'), row.attributes('aria-valuenow')])).toEqual([
      ['config.json', '100'],
      ['model.safetensors', '46'],
    ])
    expect(wrapper.text()).toContain('50 B of 100 B sent')
    second.answer(200, { sha256: sha('b'), size_bytes: 93 })
    await flushPromises()

    expect(calls).toEqual([
      {
        method: 'POST',
        path: '/v1/registry/models',
        body: {
          name: 'tiny-llama',
          files: [
            { path: 'config.json', sha256: sha('a'), size_bytes: 7 },
            { path: 'model.safetensors', sha256: sha('b'), size_bytes: 93 },
          ],
        },
      },
    ])
    expect(success).toHaveBeenCalledWith('Model tiny-llama version v1 is in the repository.')
    expect(wrapper.emitted('registered')).toEqual([[record]])
    // Ready for the next model.
    expect(wrapper.findAll('[data-test="model-upload-file"]')).toHaveLength(0)
    expect((wrapper.get('[data-test="model-name"]').element as HTMLInputElement).value).toBe('')
    wrapper.unmount()
  })

  it("sends one archive and registers it by the archive's digest, with the version given", async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const { calls } = stubFetch({ 'POST /v1/registry/models': () => json({ ...record, name: 'phi', version: 'v9' }, 201) })
    const wrapper = mountUpload()
    const files = wrapper.get<HTMLInputElement>('[data-test="model-files"]')
    Object.defineProperty(files.element, 'files', { value: [new File(['zip'], 'Phi.zip')], configurable: true })
    await files.trigger('change')
    expect(wrapper.get('[data-test="model-upload-summary"]').text()).toContain('Archive Phi.zip')
    await wrapper.get('[data-test="model-version"]').setValue('v9')
    await wrapper.get('form').trigger('submit')
    FakeXhr.last!.answer(200, { sha256: sha('c'), size_bytes: 3 })
    await flushPromises()
    expect(calls[0]?.body).toEqual({ name: 'phi', version: 'v9', archive_sha256: sha('c') })
    expect(wrapper.emitted('registered')).toHaveLength(1)
    wrapper.unmount()
  })

  it("shows the node's refusal, and a second try registers again without sending the files twice", async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    let answers = 0
    const { calls } = stubFetch({
      'POST /v1/registry/models': () => {
        answers += 1
        return answers === 1
          ? json({ error: { message: 'tiny-llama v1 already exists', type: 'invalid_request_error', param: 'version', code: 'conflict' } }, 409)
          : json({ ...record, version: 'v2' }, 201)
      },
    })
    const wrapper = mountUpload()
    await chooseFolder(wrapper, [inFolder('tiny-llama/config.json')])
    await wrapper.get('form').trigger('submit')
    FakeXhr.last!.answer(200, { sha256: sha('a'), size_bytes: 1 })
    await flushPromises()
    expect(wrapper.get('[role="alert"]').text()).toContain('tiny-llama v1 already exists')
    expect(wrapper.emitted('registered')).toBeUndefined()

    await wrapper.get('[data-test="model-version"]').setValue('v2')
    await wrapper.get('form').trigger('submit')
    await flushPromises()
    expect(FakeXhr.all).toHaveLength(1)
    expect(calls.map((c) => c.body)).toEqual([
      { name: 'tiny-llama', files: [{ path: 'config.json', sha256: sha('a'), size_bytes: 1 }] },
      { name: 'tiny-llama', version: 'v2', files: [{ path: 'config.json', sha256: sha('a'), size_bytes: 1 }] },
    ])
    expect(wrapper.emitted('registered')).toHaveLength(1)
    wrapper.unmount()
  })

  it('cancels: the request is aborted and nothing is registered', async () => {
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const info = vi.spyOn(ElMessage, 'info')
    const { calls } = stubFetch({ 'POST /v1/registry/models': () => json(record, 201) })
    const wrapper = mountUpload()
    await chooseFolder(wrapper, [inFolder('m/config.json'), inFolder('m/model.safetensors')])
    await wrapper.get('form').trigger('submit')
    FakeXhr.last!.progress(1, 2)
    await wrapper.get('[data-test="model-upload-cancel"]').trigger('click')
    await flushPromises()
    expect(FakeXhr.last!.aborted).toBe(true)
    expect(FakeXhr.all).toHaveLength(1)
    expect(calls).toEqual([])
    expect(info).toHaveBeenCalledWith('The upload was cancelled.')
    expect(wrapper.find('[data-test="model-upload-cancel"]').exists()).toBe(false)
    expect(wrapper.get('[data-test="model-upload-submit"]').attributes('disabled')).toBeUndefined()
    wrapper.unmount()
  })

  it('refuses to upload without a valid name, and explains a mixed choice', async () => {
    const wrapper = mountUpload()
    const files = wrapper.get<HTMLInputElement>('[data-test="model-files"]')
    Object.defineProperty(files.element, 'files', { value: [new File(['{}'], 'config.json'), new File(['x'], 'model.safetensors')], configurable: true })
    await files.trigger('change')
    expect(wrapper.text()).toContain('Give the model a name.')
    expect(wrapper.get('[data-test="model-upload-submit"]').attributes('disabled')).toBeDefined()
    await wrapper.get('[data-test="model-name"]').setValue('bad name')
    expect(wrapper.text()).toContain('Use up to 128 letters')
    expect(wrapper.get('[data-test="model-name"]').attributes('aria-invalid')).toBe('true')
    await wrapper.get('[data-test="model-name"]').setValue('good-name')
    expect(wrapper.get('[data-test="model-upload-submit"]').attributes('disabled')).toBeUndefined()

    Object.defineProperty(files.element, 'files', { value: [new File(['x'], 'm.zip'), new File(['{}'], 'config.json')], configurable: true })
    await files.trigger('change')
    expect(wrapper.get('[data-test="model-upload-summary"]').text()).toContain('Choose an archive on its own')
    expect(wrapper.get('[data-test="model-upload-submit"]').attributes('disabled')).toBeDefined()

    // A name typed in stays when another folder is chosen.
    await chooseFolder(wrapper, [inFolder('Other/config.json')])
    expect((wrapper.get('[data-test="model-name"]').element as HTMLInputElement).value).toBe('good-name')
    wrapper.unmount()
  })
})

describe('the models page', () => {
  const me = (role: 'admin' | 'enterprise' | 'user'): Me => ({
    user: { id: 'u1', email: 'a@b.c', phone: null, display_name: 'A', role, status: 'active', created_at_ms: 1 },
    acting_as: { kind: 'user', id: 'u1' },
    orgs: [],
    credential: { kind: 'session', session_id: 's1' },
  })

  async function mountPage(role: 'admin' | 'enterprise' | 'user', versions: ModelVersion[] = []) {
    let listed = 0
    stubFetch({
      'GET /v1/models': () => json({ object: 'list', data: [] }),
      'GET /v1/registry/models': () => {
        listed += 1
        return json({ versions })
      },
      'GET /v1/registry/catalog': () => json({ models: [] }),
    })
    const installed = plugins()
    useSessionStore().me = me(role)
    const page = mount(Models, { global: { plugins: installed, stubs: { RouterLink: true } } })
    await flushPromises()
    return { page, listed: () => listed }
  }

  it('shows administrators the upload in the repository tab, and reloads the list after a registration', async () => {
    const { page, listed } = await mountPage('admin')
    expect(page.find('[data-test="model-upload"]').exists()).toBe(true)
    expect(listed()).toBe(1)
    page.getComponent(ModelUpload).vm.$emit('registered', record)
    await flushPromises()
    expect(listed()).toBe(2)
    page.unmount()
  })

  it('shows other users no upload', async () => {
    const { page } = await mountPage('user')
    expect(page.find('[data-test="model-upload"]').exists()).toBe(false)
    page.unmount()
  })

  it('lets enterprise users upload models of their own, listed apart from the platform model of the same name', async () => {
    const platform = fullVersion('tiny', 'platform', '', 'v1')
    const own = { ...fullVersion('tiny', 'user', 'u1', 'v1'), id: 'mv-own', model_id: 'model-own' }
    const { page } = await mountPage('enterprise', [platform, own])
    expect(page.find('[data-test="model-upload"]').exists()).toBe(true)
    expect(page.text()).toContain('Models you upload are yours')
    await page.get('#tab-repository').trigger('click')
    await flushPromises()
    const rows = page.findAll('[data-test="repository-table"] .el-table__body tr')
    expect(rows.map((row) => row.text())).toEqual([expect.stringContaining('Platform'), expect.stringContaining('Yours')])
    page.unmount()
  })
})

describe('grouping the repository by model', () => {
  const version = fullVersion

  it('keeps one owner\'s model apart from another\'s of the same name, versions newest first', () => {
    const groups = groupByModel([
      version('tiny', 'platform', '', 'v2'),
      version('tiny', 'platform', '', 'v1'),
      version('tiny', 'user', 'u1', 'v1'),
      version('tiny', 'org', 'o1', 'v1'),
    ])
    expect(groups.map((g) => [g.key, g.versions.map((v) => v.version), g.latest.version])).toEqual([
      ['platform::tiny', ['v2', 'v1'], 'v2'],
      ['user:u1:tiny', ['v1'], 'v1'],
      ['org:o1:tiny', ['v1'], 'v1'],
    ])
    expect(groupByModel([])).toEqual([])
  })

  it('offers a tenant its own model in place of the platform model of the same name', () => {
    const listed = [
      version('tiny', 'platform', '', 'v2'),
      version('tiny', 'user', 'u1', 'v1'),
      version('other', 'platform', '', 'v1'),
    ]
    const names = (vs: ModelVersion[]) => vs.map((v) => `${v.owner_kind}:${v.name}:${v.version}`)
    expect(names(deployableVersions(listed, false))).toEqual(['user:tiny:v1', 'platform:other:v1'])
    expect(names(deployableVersions(listed, true))).toEqual(['platform:tiny:v2', 'platform:other:v1'])
  })
})
