// Tokenizer alone in transformers.js (Node), from an export dir exactly as lorax wrote it.
//
//   node tests/clients/transformers_js_tokenizer.mjs < request.json > reply.json
//   request: {"dir": "dist/onnx", "texts": ["..."], "chats": [[{"role": "user", "content": "..."}]]}
//   reply:   {"ids": [[...]], "chat_ids": [[...]], "chat_texts": ["..."]}
//
// LORAX_NPM_DIR: the folder where `npm install @huggingface/transformers` ran (tests/client_helpers.py).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const require = createRequire(path.join(process.env.LORAX_NPM_DIR, "package.json"));
const entry = require.resolve("@huggingface/transformers");
const { env, AutoTokenizer } = await import(pathToFileURL(entry).href);

const req = JSON.parse(readFileSync(0, "utf8"));
const dir = path.resolve(req.dir);
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = path.dirname(dir) + path.sep;
const tokenizer = await AutoTokenizer.from_pretrained(path.basename(dir));
const ids = req.texts.map((t) => Array.from(tokenizer.encode(t), Number));
const chat_texts = req.chats.map((c) => tokenizer.apply_chat_template(c, { add_generation_prompt: true, tokenize: false }));
const chat_ids = chat_texts.map((t) => Array.from(tokenizer.encode(t, { add_special_tokens: false }), Number));
console.log(JSON.stringify({ ids, chat_ids, chat_texts }));
