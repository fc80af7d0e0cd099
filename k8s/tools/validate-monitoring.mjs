// Validates prometheus-operator objects (PodMonitor, PrometheusRule, ...: monitoring.coreos.com) against the
// operator's API schemas, as shipped by @kubernetes-models/prometheus-operator (generated from the operator's Go API
// types; its validators check types, enums, patterns such as a Duration's, and required fields).
//
//   kubectl kustomize k8s/overlays/prod | <the monitoring.coreos.com objects as a JSON array> \
//     | node k8s/tools/validate-monitoring.mjs
//
// Input: a JSON array of objects on stdin. Output: one line per object, `ok KIND/NAME` or `invalid KIND/NAME: PATH:
// MESSAGE; ...`. Exit status 0 when every object is valid, 1 when one is not, 2 when the input is not usable.
// tests/unit/test_k8s_monitoring.py runs it on the rendered prod overlay. Install: npm ci --prefix k8s/tools
import * as v1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
import * as v1alpha1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1alpha1";
import * as v1beta1 from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1beta1";

const GROUP = "monitoring.coreos.com";
const MODELS = { [`${GROUP}/v1`]: v1, [`${GROUP}/v1alpha1`]: v1alpha1, [`${GROUP}/v1beta1`]: v1beta1 };

function describe(obj) {
  return `${obj?.kind ?? "?"}/${obj?.metadata?.name ?? "?"}`;
}

function problems(obj) {
  const models = MODELS[obj?.apiVersion];
  if (!models) {
    return [`apiVersion ${JSON.stringify(obj?.apiVersion)} is not one of ${Object.keys(MODELS).join(", ")}`];
  }
  const Model = Object.hasOwn(models, obj.kind) ? models[obj.kind] : undefined;
  if (typeof Model?.prototype?.validate !== "function") {
    return [`kind ${JSON.stringify(obj.kind)} is not a ${obj.apiVersion} kind`];
  }
  try {
    new Model(obj).validate();
    return [];
  } catch (err) {
    if (!Array.isArray(err.errors)) throw err;
    // ajv reports one error per schema branch: keep each path and message once
    const lines = err.errors.map((e) => {
      const allowed = e.params?.allowedValues ? ` (allowed: ${e.params.allowedValues.join(", ")})` : "";
      return `${e.instancePath || "/"}: ${e.message ?? e.keyword}${allowed}`;
    });
    return [...new Set(lines)];
  }
}

let text = "";
process.stdin.setEncoding("utf8");
for await (const chunk of process.stdin) text += chunk;

let objects;
try {
  objects = JSON.parse(text);
} catch (err) {
  console.error(`stdin is not JSON: ${err.message}`);
  process.exit(2);
}
if (!Array.isArray(objects)) {
  console.error(`stdin must be a JSON array of objects, got ${typeof objects}`);
  process.exit(2);
}

let failed = 0;
for (const obj of objects) {
  const found = problems(obj);
  if (found.length) failed += 1;
  console.log(found.length ? `invalid ${describe(obj)}: ${found.join("; ")}` : `ok ${describe(obj)}`);
}
process.exit(failed ? 1 : 0);
