/// <reference types="vitest/config" />
import { defineConfig } from 'vite'
import vue from '@vitejs/plugin-vue'

// The node serves the built files (embedded by gateway/build.rs); `npm run dev` proxies the
// API to a node on 127.0.0.1:8080 so the session cookie stays same-origin.
const api = 'http://127.0.0.1:8080'

export default defineConfig({
  plugins: [vue()],
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    chunkSizeWarningLimit: 1500,
    rollupOptions: {
      output: {
        manualChunks: {
          vue: ['vue', 'vue-router', 'pinia', 'vue-i18n'],
          'element-plus': ['element-plus'],
          echarts: ['echarts/core', 'echarts/charts', 'echarts/components', 'echarts/renderers', 'vue-echarts'],
        },
      },
    },
  },
  server: {
    proxy: {
      '/v1': { target: api, ws: true },
      '/healthz': api,
      '/readyz': api,
      '/openapi.json': api,
    },
  },
  test: {
    environment: 'happy-dom',
    include: ['src/**/*.test.ts'],
    css: false,
    server: { deps: { inline: ['element-plus'] } },
  },
})
