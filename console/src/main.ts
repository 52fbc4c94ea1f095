import { createApp } from 'vue'
import { createPinia } from 'pinia'
import ElementPlus from 'element-plus'
import 'element-plus/dist/index.css'
import './style.css'
import App from './App.vue'
import { i18n, setLocale } from './i18n'
import { makeRouter } from './router'
import { onUnauthorized } from './api/client'
import { useSessionStore } from './stores/session'

const app = createApp(App)
const pinia = createPinia()
app.use(pinia)
app.use(i18n)
app.use(ElementPlus)
const router = makeRouter()
app.use(router)
setLocale(i18n.global.locale.value)

// A 401 from any call means the session is gone: back to the sign-in page.
onUnauthorized(() => {
  const session = useSessionStore(pinia)
  if (!session.signedIn) return
  session.forget()
  const current = router.currentRoute.value
  if (!current.meta.public) void router.push({ name: 'signin', query: { next: current.fullPath, expired: '1' } })
})

app.mount('#app')
