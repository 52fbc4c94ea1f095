import { afterEach, describe, expect, it, vi } from 'vitest'
import { defineComponent, h } from 'vue'
import { flushPromises, mount } from '@vue/test-utils'
import type { FineTuningEvent, FineTuningJob } from '../api/types'
import { FakeXhr, json, plugins, stubFetch } from '../test/helpers'

afterEach(() => {
  vi.unstubAllGlobals()
  FakeXhr.reset()
})

function job(over: Partial<FineTuningJob> = {}): FineTuningJob {
  return {
    id: 'ftjob-0001',
    object: 'fine_tuning.job',
    model: 'tiny:v1',
    created_at: 1_700_000_000,
    finished_at: null,
    fine_tuned_model: null,
    organization_id: 'user_1',
    status: 'running',
    hyperparameters: { n_epochs: 3, batch_size: 4, learning_rate_multiplier: 1 },
    training_file: 'file-1',
    validation_file: null,
    result_files: [],
    trained_tokens: null,
    error: null,
    seed: 7,
    suffix: null,
    estimated_finish: null,
    integrations: [],
    method: { type: 'supervised', supervised: { hyperparameters: { n_epochs: 3, batch_size: 4, learning_rate_multiplier: 1 } } },
    tuning: { type: 'lora', rank: 8, alpha: 16 },
    total_steps: 30,
    steps_done: 12,
    gpus: 1,
    gpu_seconds: 4.5,
    node: 'node-1',
    started_at: 1_700_000_001,
    ...over,
  }
}

function metrics(step: number, loss: number, valid?: number): FineTuningEvent {
  const data: NonNullable<FineTuningEvent['data']> = { step, train_loss: loss, total_steps: 30 }
  if (valid !== undefined) data.valid_loss = valid
  return { id: `ftevent-${step + 1}`, object: 'fine_tuning.job.event', created_at: 1, level: 'info', message: `Step ${step}`, data, type: 'metrics' }
}

/** Keeps the chart's option instead of drawing it (no canvas here). */
const charts: unknown[] = []
const ChartStub = defineComponent({
  props: { option: { type: Object, required: true }, label: { type: String, required: true } },
  setup(props) {
    charts.push(props.option)
    return () => h('div', { 'data-test': 'loss-chart', 'aria-label': props.label })
  },
})

describe('the fine-tuning page', () => {
  it('lists jobs with their state and draws the selected one\'s loss curve from its events', async () => {
    const { default: FineTuning } = await import('./FineTuning.vue')
    const started: FineTuningEvent = {
      id: 'ftevent-1', object: 'fine_tuning.job.event', created_at: 1, level: 'info', message: 'Fine-tuning job started on node-1 (1 GPU)', data: null, type: 'message',
    }
    const { calls } = stubFetch({
      'GET /v1/fine_tuning/jobs': () => json({ object: 'list', data: [job(), job({ id: 'ftjob-0002', status: 'failed', error: { code: 'quota_exceeded', message: 'gpu_hours_per_month limit reached', param: null } })], has_more: false }),
      'GET /v1/fine_tuning/jobs/ftjob-0001/events': () =>
        json({ object: 'list', data: [started, metrics(1, 4.2), metrics(2, 3.1), metrics(3, 2.0, 2.4)], has_more: false }),
    })
    charts.length = 0
    const page = mount(FineTuning, { global: { plugins: plugins(), stubs: { Chart: ChartStub } } })
    await flushPromises()
    expect(page.text()).toContain('running')
    expect(page.text()).toContain('12 / 30')
    expect(page.text()).toContain('gpu_hours_per_month limit reached')
    expect(page.find('[data-test="job-detail"]').exists()).toBe(false)

    await page.find('button[aria-label="Show job ftjob-0001"]').trigger('click')
    await flushPromises()
    expect(calls.some((c) => c.path === '/v1/fine_tuning/jobs/ftjob-0001/events')).toBe(true)
    expect(page.find('[data-test="job-detail"]').text()).toContain('Fine-tuning job started on node-1')
    const option = charts[charts.length - 1] as { series: Array<{ data: [number, number][] }> }
    expect(option.series[0]?.data).toEqual([[1, 4.2], [2, 3.1], [3, 2.0]])
    expect(option.series[1]?.data).toEqual([[3, 2.4]])
    page.unmount()
  })

  it('uploads the training file, then creates the job with the chosen method', async () => {
    const { default: FineTuning } = await import('./FineTuning.vue')
    vi.stubGlobal('XMLHttpRequest', FakeXhr)
    const { calls } = stubFetch({
      'GET /v1/fine_tuning/jobs': () => json({ object: 'list', data: [], has_more: false }),
      'GET /v1/registry/models': () =>
        json({ versions: [
          { name: 'tiny', version: 'v1', format: 'safetensors', tasks: ['chat'] },
          { name: 'minilm', version: 'v1', format: 'safetensors', tasks: ['embedding'] },
          { name: 'q4', version: 'v1', format: 'gguf', tasks: ['chat'] },
        ] }),
      'POST /v1/fine_tuning/jobs': () => json(job({ id: 'ftjob-0003', status: 'queued', steps_done: 0 })),
      'GET /v1/fine_tuning/jobs/ftjob-0003/events': () => json({ object: 'list', data: [], has_more: false }),
    })
    const page = mount(FineTuning, { global: { plugins: plugins(), stubs: { Chart: ChartStub } }, attachTo: document.body })
    await flushPromises()
    expect(page.text()).toContain('No fine-tuning jobs yet')
    await page.find('[data-test="new-job"]').trigger('click')
    await flushPromises()
    const input = document.querySelector('input[data-test="ft-file"]') as HTMLInputElement
    const file = new File(['{"prompt":"a","completion":"b"}\n'], 'train.jsonl', { type: 'application/jsonl' })
    Object.defineProperty(input, 'files', { value: [file] })
    input.dispatchEvent(new Event('change'))
    await flushPromises()
    ;(document.querySelector('[data-test="create-job"]') as HTMLButtonElement).click()
    await flushPromises()
    const upload = FakeXhr.last
    expect(upload?.url).toBe('/v1/files')
    expect((upload?.body as FormData).get('purpose')).toBe('fine-tune')
    upload!.status = 200
    upload!.responseText = JSON.stringify({ id: 'file-9', object: 'file' })
    upload!.onload?.()
    await flushPromises()
    const created = calls.find((c) => c.method === 'POST' && c.path === '/v1/fine_tuning/jobs')
    expect(created?.body).toEqual({
      model: 'tiny:v1',
      training_file: 'file-9',
      hyperparameters: { n_epochs: 3, batch_size: 4, learning_rate_multiplier: 1 },
      tuning: { type: 'lora', rank: 8, alpha: 16 },
    })
    page.unmount()
  })
})
