// The hand-written declarations (src/*.d.ts) compile, and describe the API as typecheck.ts
// uses it (strict TypeScript). Skipped when TypeScript (a devDependency) is not installed.
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { test } from "node:test";

const root = fileURLToPath(new URL("..", import.meta.url));
let tsc = null;
try {
  tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
} catch {
  // not installed (npm ci --omit=dev)
}

test("the TypeScript declarations type-check", { skip: tsc && existsSync(tsc) ? false : "typescript is not installed" }, () => {
  const done = spawnSync(process.execPath, [tsc, "-p", "test/tsconfig.json"], { cwd: root, encoding: "utf8" });
  assert.equal(done.status, 0, `tsc failed:\n${done.stdout}${done.stderr}`);
});
