// Greedy generation in transformers.js (Node), from an export dir exactly as lorax wrote it.
//
//   node tests/clients/transformers_js.mjs < request.json > reply.json
//   request: {"dir": "dist/onnx", "dtype": "fp32", "chats": ["What is ...?"], "max_new_tokens": 16}
//   reply:   {"results": [{"prompt_ids": [...], "tokens": [...]}]}
//
// LORAX_NPM_DIR: the folder where `npm install @huggingface/transformers` ran (tests/clients/npm.py).
// Loads only local files (no hub): the model id is the dir's name, looked up under its parent.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(path.join(process.env.LORAX_NPM_DIR, "package.json"));
const entry = require.resolve("@huggingface/transformers");
const { env, AutoTokenizer, AutoModelForCausalLM } = await import(pathToFileURL(entry).href);

const req = JSON.parse(readFileSync(0, "utf8"));
const dir = path.resolve(req.dir);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(dir) + path.sep;
const id = path.basename(dir);

const tokenizer = await AutoTokenizer.from_pretrained(id);
const model = await AutoModelForCausalLM.from_pretrained(id, { dtype: req.dtype ?? "fp32", device: "cpu" });
const results = [];
for (const chat of req.chats) {
  // The chat template comes from tokenizer_config.json: the only place transformers.js reads it.
  const inputs = tokenizer.apply_chat_template([{ role: "user", content: chat }],
    { add_generation_prompt: true, return_dict: true });
  const out = await model.generate({ ...inputs, max_new_tokens: req.max_new_tokens, do_sample: false });
  const all = Array.from(out.tolist()[0], Number);
  const prompt = Array.from(inputs.input_ids.tolist()[0], Number);
  results.push({ prompt_ids: prompt, tokens: all.slice(prompt.length) });
}
console.log(JSON.stringify({ results }));
