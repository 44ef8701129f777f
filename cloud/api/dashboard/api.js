// The REST client: every call goes to /api/v1 with the operator's Bearer token.
// The token lives in sessionStorage (this tab only); a 401 anywhere signs the operator out.

const TOKEN_KEY = 'fednano.token';
// Relative to the dashboard's folder, so the dashboard also works behind a path prefix.
const API_ROOT = new URL('../api/v1/', document.baseURI);

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export const auth = {
  get token() { return sessionStorage.getItem(TOKEN_KEY); },
  set(token) { sessionStorage.setItem(TOKEN_KEY, token); },
  clear() { sessionStorage.removeItem(TOKEN_KEY); },
};

/** FastAPI's ``detail``: a string, or a list of {loc, msg} naming the bad field. */
function describe(detail, fallback) {
  if (typeof detail === 'string') return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).slice(1).join('.') || 'request'}: ${e.msg}`)
      .join('; ');
  }
  return fallback;
}

async function errorOf(response) {
  let detail = null;
  try { detail = (await response.json()).detail; } catch { /* not JSON */ }
  return new ApiError(response.status, describe(detail, `${response.status} ${response.statusText}`));
}

/**
 * Call the API: ``api('/devices', {query: {limit: 10}})``, ``api('/rounds', {method: 'POST',
 * body: {...}})``; ``as: 'blob' | 'text'`` for downloads. Throws ``ApiError``.
 */
export async function api(path, { method = 'GET', body, query, as = 'json' } = {}) {
  const url = new URL(path.replace(/^\//, ''), API_ROOT);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, value);
  }
  const headers = { Accept: as === 'json' ? 'application/json' : '*/*' };
  const token = auth.token;
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(url, {
    method, headers, cache: 'no-store', credentials: 'omit',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401) {
      window.dispatchEvent(new CustomEvent('fednano:unauthorized', { detail: error.message }));
    }
    throw error;
  }
  if (as === 'blob') return response.blob();
  if (as === 'text') return response.text();
  return response.status === 204 ? null : response.json();
}

/** Save ``blob`` as a file named ``name`` (a download the operator keeps). */
export function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement('a');
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
