#!/usr/bin/env bash
# Generates the JSON schemas in this directory from the TypeScript types of the npm package
# @grafana/schema (the types Grafana's own frontend is built with), with ts-json-schema-generator:
# the dashboard (the classic JSON model Grafana imports from a file) and the options and field
# config of the panel types the dashboard uses. tests/test_grafana.py validates
# config/grafana/*.json against them; .ci/run regenerates them and fails if they differ.
#
#   config/grafana/schema/generate.sh [OUT_DIR]    (default: this directory; about 10 s)
set -euo pipefail
out="$(realpath "${1:-$(dirname "$0")}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
npm install --prefix "$work" --no-save --no-audit --no-fund --loglevel=error \
    @grafana/schema@13.2.3 ts-json-schema-generator@2.10.0
raw="$work/node_modules/@grafana/schema/dist/types/raw"
gen() {  # type file -> schema; --no-type-check: the .d.ts files are generated and consistent
    "$work/node_modules/.bin/ts-json-schema-generator" --no-type-check --path "$2" --type "$1" \
        --out "$3"
}
gen Dashboard "$raw/dashboard/x/types.gen.d.ts" "$out/dashboard.schema.json"
for panel in stat timeseries table; do
    gen Options "$raw/composable/$panel/panelcfg/x/types.gen.d.ts" "$out/$panel.options.schema.json"
done
for panel in timeseries table; do
    gen FieldConfig "$raw/composable/$panel/panelcfg/x/types.gen.d.ts" \
        "$out/$panel.fieldconfig.schema.json"
done
