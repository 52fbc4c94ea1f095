import { afterEach, describe, expect, it, vi } from 'vitest'
import { flushPromises, mount } from '@vue/test-utils'
import MemoryBar from './MemoryBar.vue'
import ErrorAlert from './ErrorAlert.vue'
import FilePicker from './FilePicker.vue'
import { makeI18n } from '../i18n'
import ElementPlus from 'element-plus'
import Keys from '../views/Keys.vue'
import { ApiError } from '../api/client'
import { json, plugins, stubFetch } from '../test/helpers'

afterEach(() => vi.unstubAllGlobals())

describe('MemoryBar', () => {
  it('shows reserved of total memory in words and as a percentage', () => {
    const bar = mount(MemoryBar, { props: { usedMib: 61440, totalMib: 81920, label: 'gpu 0' }, global: { plugins: plugins() } })
    expect(bar.text()).toContain('60.0 GiB / 80.0 GiB (75%)')
    const progress = bar.find('[role="progressbar"]')
    expect(progress.attributes('aria-valuenow')).toBe('75')
    expect(progress.attributes('aria-label')).toBe('gpu 0: 60.0 GiB / 80.0 GiB')
  })

  it('copes with a GPU of unknown size', () => {
    const bar = mount(MemoryBar, { props: { usedMib: 0, totalMib: 0 }, global: { plugins: plugins() } })
    expect(bar.text()).toContain('(0%)')
  })
})

describe('FilePicker', () => {
  it("speaks the console's language, names the choice, passes the change on and forgets it", async () => {
    const picker = mount(FilePicker, { props: { id: 'f', dataTest: 'pick' }, global: { plugins: [makeI18n('zh'), ElementPlus] } })
    expect(picker.get('button').text()).toBe('选择文件')
    expect(picker.get('#f-chosen').text()).toBe('未选择文件')
    expect(picker.get('button').attributes('aria-describedby')).toBe('f-chosen')
    const input = picker.get<HTMLInputElement>('[data-test="pick"]')
    expect(input.attributes('type')).toBe('file')
    Object.defineProperty(input.element, 'files', { value: [new File(['x'], 'notes.md')], configurable: true })
    await input.trigger('change')
    expect(picker.get('#f-chosen').text()).toBe('notes.md')
    expect(picker.emitted('change')).toHaveLength(1)
    ;(picker.vm as unknown as { clear: () => void }).clear()
    await picker.vm.$nextTick()
    expect(picker.get('#f-chosen').text()).toBe('未选择文件')
  })

  it('offers a folder where it takes one', () => {
    const picker = mount(FilePicker, { props: { id: 'd', directory: true }, global: { plugins: plugins() } })
    expect(picker.get('button').text()).toBe('Choose a folder')
    expect(picker.get('input').attributes('webkitdirectory')).toBeDefined()
  })
})

describe('ErrorAlert', () => {
  it("shows the API's own message", () => {
    const alert = mount(ErrorAlert, {
      props: { error: new ApiError(400, 'weak_password', 'add another word or two') },
      global: { plugins: plugins() },
    })
    expect(alert.get('[role="alert"]').text()).toContain('add another word or two')
  })

  it('says in the chosen language that the node cannot be reached', () => {
    const alert = mount(ErrorAlert, { props: { error: new ApiError(0, 'network_error', 'network') }, global: { plugins: plugins() } })
    expect(alert.text()).toContain('The node cannot be reached')
  })

  it('renders nothing without an error', () => {
    const alert = mount(ErrorAlert, { props: { error: null }, global: { plugins: plugins() } })
    expect(alert.find('[role="alert"]').exists()).toBe(false)
  })
})

describe('the API keys page', () => {
  it('lists keys, and shows a new key once after creating it', async () => {
    const listed = { id: 'k1', object: 'api_key', name: 'old', prefix: 'sk-maas-aa', scopes: ['inference'], allowed_models: [], created_at: 1, expires_at: null, last_used_at: null, revoked_at: null, status: 'active' }
    const { calls } = stubFetch({
      'GET /v1/keys': () => json({ object: 'list', data: [listed] }),
      'POST /v1/keys': () => json({ ...listed, id: 'k2', name: 'ci', prefix: 'sk-maas-bb', key: 'sk-maas-bbsecret' }, 201),
    })
    const page = mount(Keys, { global: { plugins: plugins() }, attachTo: document.body })
    await flushPromises()
    expect(page.text()).toContain('old')
    expect(page.find('[data-test="new-secret"]').exists()).toBe(false)

    await page.get('[data-test="new-key"]').trigger('click')
    await flushPromises()
    const name = document.querySelector<HTMLInputElement>('[data-test="key-name"] input, input[data-test="key-name"]')
    expect(name).not.toBeNull()
    name!.value = 'ci'
    name!.dispatchEvent(new Event('input'))
    document.querySelector<HTMLButtonElement>('[data-test="create-key"]')!.click()
    await flushPromises()

    expect(calls.find((c) => c.method === 'POST')?.body).toMatchObject({ name: 'ci', scopes: ['inference'], allowed_models: [] })
    expect(page.get('[data-test="secret-text"]').text()).toBe('sk-maas-bbsecret')
    expect(page.get('[data-test="keys-table"]').text()).not.toContain('sk-maas-bbsecret')
    page.unmount()
  })
})
