// Validates Prometheus operator objects (JSON documents, one per argument) against the schemas
// of their CRDs, as compiled into @kubernetes-models/prometheus-operator (ajv). Prints one
// line per document, "ok KIND NAME" or "invalid KIND NAME: <errors>"; exits 1 if any is invalid.
// Usage: node validate_crd.mjs NODE_MODULES_DIR DOC.json...
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modules, ...docs] = process.argv.slice(2);
let failed = 0;
for (const file of docs) {
  const doc = JSON.parse(readFileSync(file, "utf8"));
  const [group, version] = doc.apiVersion.split("/");
  const path = join(modules, "@kubernetes-models/prometheus-operator", group, version, `${doc.kind}.js`);
  const model = (await import(pathToFileURL(path).href))[doc.kind];
  try {
    new model(doc).validate();
    console.log(`ok ${doc.kind} ${doc.metadata.name}`);
  } catch (err) {
    failed++;
    console.log(`invalid ${doc.kind} ${doc.metadata.name}: ${JSON.stringify(err.details ?? err.message)}`);
  }
}
process.exit(failed ? 1 : 0);
