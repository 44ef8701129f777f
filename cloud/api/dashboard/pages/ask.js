// Ask the current global model: upload an image, type a question, get its answer.

import { api } from '../api.js';
import { bar, fill, fmt, h } from '../dom.js';

const MAX_BYTES = 4 * 1024 * 1024; // the API's limit

function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(',', 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export default {
  title: 'Ask the model',
  mount(root, ctx) {
    let previewUrl = null;
    const file = h('input', { type: 'file', id: 'ask-image', accept: 'image/*', required: true });
    const preview = h('img', { id: 'ask-preview', alt: 'the image you picked', hidden: true });
    const question = h('input', {
      id: 'ask-question', required: true, maxlength: '300', placeholder: 'What color is the shape?',
    });
    const button = h('button', { type: 'submit', id: 'ask-button' }, 'Ask');
    const result = h('div', { id: 'ask-result', class: 'answer', 'aria-live': 'polite' });
    const current = h('p', { class: 'muted', id: 'ask-current' });

    file.addEventListener('change', () => {
      if (previewUrl) URL.revokeObjectURL(previewUrl);
      const picked = file.files[0];
      previewUrl = picked ? URL.createObjectURL(picked) : null;
      preview.hidden = !picked;
      if (picked) preview.src = previewUrl;
    });

    const form = h('form', { id: 'ask-form', class: 'ask-form' },
      h('label', {}, 'Image', file), preview,
      h('label', {}, 'Question', question), button);
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      const picked = file.files[0];
      if (!picked) return;
      if (picked.size > MAX_BYTES) { ctx.error(new Error(`the image is over ${fmt.bytes(MAX_BYTES)}`)); return; }
      button.disabled = true;
      fill(result, h('p', { class: 'muted' }, 'Thinking…'));
      try {
        const answer = await api('/ask', {
          method: 'POST', body: { question: question.value, image_base64: await readAsBase64(picked) },
        });
        show(answer);
      } catch (err) {
        fill(result, h('p', { class: 'error', id: 'ask-error' }, err.message));
        ctx.error(err);
      } finally { button.disabled = false; }
    });

    function show(answer) {
      result.dataset.versionId = answer.version_id;
      fill(result,
        h('div', { class: 'answer-main' },
          h('span', { class: 'muted' }, 'Answer'),
          h('strong', { id: 'ask-answer' }, answer.best_candidate ?? answer.answer)),
        answer.candidates.length ? h('ol', { class: 'candidates', id: 'ask-candidates' },
          answer.candidates.slice(0, 5).map((c) => h('li', { dataset: { answer: c.answer } },
            h('span', { class: 'candidate' }, c.answer), bar(c.probability), fmt.pct(c.probability)))) : null,
        h('p', { class: 'muted' }, 'Free text: ', h('q', { id: 'ask-free-text' }, answer.answer || '(nothing)')),
        h('p', { class: 'muted', id: 'ask-meta' },
          `global version v${answer.version_id} · ${answer.elapsed_ms.toFixed(0)} ms`));
    }

    root.append(
      h('div', { class: 'page-head' }, h('h1', {}, 'Ask the model'),
        h('p', { class: 'muted' }, 'The current global adapters on the frozen base: the image goes through the ',
          'encoder, connector and NanoAdapters, the question through the LLM in the cloud.')),
      h('div', { class: 'ask-grid' },
        h('section', { class: 'panel' }, h('h2', {}, 'Question'), current, form),
        h('section', { class: 'panel' }, h('h2', {}, 'Answer'), result)));

    return {
      async refresh() {
        const latest = (await api('/models', { query: { limit: 1 } })).items[0];
        current.textContent = latest
          ? `Current global version: v${latest.id}${latest.round_id ? ` (round #${latest.round_id}, ${latest.strategy})` : ' (initial)'}`
          : 'No global version yet.';
      },
      unmount() { if (previewUrl) URL.revokeObjectURL(previewUrl); },
    };
  },
};
