// Play one clarify-or-answer episode against `simkit env-server` from Node (18+, no packages).
//   simkit env-server --env toy --port 8200 &
//   node examples/env_client.mjs http://127.0.0.1:8200 toy
// Bearer token (when the server requires one): $SIMKIT_ENV_SERVER_KEY.
const [url = "http://127.0.0.1:8200", env = "toy"] = process.argv.slice(2);
const headers = { "Content-Type": "application/json" };
if (process.env.SIMKIT_ENV_SERVER_KEY) headers.Authorization = `Bearer ${process.env.SIMKIT_ENV_SERVER_KEY}`;

async function call(method, path, body) {
  const r = await fetch(url + path, { method, headers, body: body && JSON.stringify(body) });
  const out = await r.json();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${out.error.message} (field: ${out.error.param})`);
  return out;
}

const info = await call("GET", `/envs/${env}`);
const split = Object.keys(info.splits).at(-1);
const { tasks: [task] } = await call("GET", `/envs/${env}/tasks?split=${split}&limit=1&full=true`);
const { episode_id, observation } = await call("POST", "/episodes", { env, task_id: task.id });
console.log(`episode ${episode_id} on ${task.id}: ${observation.at(-1).content}`);

// A scripted agent: ask first, then answer with the task's goal (a real agent would call its model here).
let step = await call("POST", `/episodes/${episode_id}/step`, { text: "Which one do you mean?" });
console.log(`action=${step.info.action} user: ${step.observation}`);
while (!step.terminated && !step.truncated) {
  step = await call("POST", `/episodes/${episode_id}/step`, { text: String(task.goal) });
}
const { trajectory } = await call("GET", `/episodes/${episode_id}`);
console.log(`action=${step.info.action} reward=${step.reward} turns=${trajectory.turns.length}`);
await call("DELETE", `/episodes/${episode_id}`);
