// Service worker: keeps every file of the app in the browser's cache, so the page opens and
// classifies with no network once it has been opened (from localhost or HTTPS: browsers run
// service workers only there). `kdflax app` fills in VERSION (a digest of the files) and
// FILES; a rebuilt folder has a new VERSION, and the old cache is dropped on activation.
const CACHE = 'kdflax-app-__VERSION__';
const FILES = __FILES__;

self.addEventListener('install', (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(FILES))
      .then(() => self.skipWaiting()));
});

self.addEventListener('activate', (event) => {
  event.waitUntil(caches.keys()
      .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()));
});

self.addEventListener('fetch', (event) => {
  const request = event.request;
  if (request.method !== 'GET' || new URL(request.url).origin !== self.location.origin) return;
  event.respondWith(caches.open(CACHE).then((cache) => cache.match(request, {ignoreSearch: true})
      .then((hit) => hit || fetch(request).then((response) => {
        if (response.ok) cache.put(request, response.clone());
        return response;
      }))));
});
