#!/usr/bin/env bash
# Checks deploy/ (scripts/test.sh runs it; it builds nothing):
#   * yamllint on every YAML file under deploy/ (deploy/.yamllint.yaml);
#   * hadolint on deploy/docker/Dockerfile;
#   * renders every overlay (dev, prod) with every combination of the
#     opt-in components (network-policies; no mesh, linkerd or istio;
#     jetstream; redis-cluster), and the dev dependencies, with
#     `kubectl kustomize`;
#   * validates every render with `kubernetes-validate --strict` against
#     the oldest Kubernetes the manifests support (1.30: native sidecars,
#     the preStop sleep action) and the newest it knows. It has no schemas
#     for custom resources: those kinds (the mesh routes, JetStream
#     streams) are listed below and only rendered; any other warning fails;
#   * checks that every rpc a mesh route names exists in proto/ (a route
#     naming a method that does not exist silently matches nothing);
#   * scans with checkov (skipped rules justified below) the renders that
#     hold every resource variant: each overlay with each mesh and every
#     other component on (the components add resources and settings, none
#     removes any), and the dev dependencies.
# Any error fails the script. The Python tools are pinned in
# deploy/check-requirements.txt and installed into a virtualenv
# ($DEPLOY_TOOLS_DIR, default ~/.cache/clm/deploy-tools; not a CLM_* name,
# which the services read as configuration) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

tools="${DEPLOY_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/clm/deploy-tools}"
reqs=deploy/check-requirements.txt
k8s=deploy/k8s

fail() { printf 'check-deploy: FAILED: %s\n' "$*" >&2; exit 1; }
say() { printf -- '--- %s\n' "$*"; }

command -v kubectl >/dev/null || fail "kubectl is not installed (it renders the kustomizations)"

# The tools, installed once per requirements file (a stamp holds its hash).
stamp="$tools/.requirements.sha256"
want="$(sha256sum "$reqs" | cut -d' ' -f1)"
if [ ! -x "$tools/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing $(grep -cv '^#' "$reqs") tools into $tools"
  python3 -m venv "$tools"
  "$tools/bin/pip" install --quiet --disable-pip-version-check -r "$reqs"
  printf '%s\n' "$want" >"$stamp"
fi
bin="$tools/bin"

work="$(mktemp -d "${TMPDIR:-/tmp}/clm-check-deploy.XXXXXX")"
trap 'rm -rf "$work"' EXIT

say "yamllint deploy/"
"$bin/yamllint" --strict -c deploy/.yamllint.yaml deploy

say "hadolint deploy/docker/Dockerfile"
"$bin/hadolint" deploy/docker/Dockerfile

# Every overlay x network policies on/off x mesh (none, linkerd, istio) x
# jetstream on/off x redis-cluster on/off, each through a kustomization
# made here (as an operator's own overlay would be).
say "kubectl kustomize: every overlay and component combination"
renders="$work/renders"
scan="$work/scan"
mkdir -p "$renders" "$scan"
rel="$(realpath --relative-to="$work" "$k8s")"
count=0
render() { # NAME OVERLAY COMPONENT...
  local name="$1" overlay="$2" dir="$work/k/$1" out c
  shift 2
  mkdir -p "$dir"
  {
    printf 'apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: clm\n'
    printf 'resources:\n  - ../../%s/overlays/%s\n' "$rel" "$overlay"
    [ "$#" -eq 0 ] || printf 'components:\n'
    for c in "$@"; do printf '  - ../../%s/components/%s\n' "$rel" "$c"; done
  } >"$dir/kustomization.yaml"
  out="$renders/$name.yaml"
  kubectl kustomize "$dir" >"$out" || fail "kubectl kustomize $name"
  case "$name" in *+network-policies*+jetstream+redis-cluster) cp "$out" "$scan/" ;; esac
  count=$((count + 1))
}
for overlay in dev prod; do
  for netpol in "" network-policies; do
    for mesh in "" linkerd istio; do
      for js in "" jetstream; do
        for rc in "" redis-cluster; do
          comps=()
          for c in $netpol $mesh $js $rc; do comps+=("$c"); done
          name="$overlay"
          for c in "${comps[@]}"; do name="$name+$c"; done
          render "$name" "$overlay" "${comps[@]}"
        done
      done
    done
  done
done
kubectl kustomize "$k8s/dev-deps" >"$renders/dev-deps.yaml" || fail "kubectl kustomize dev-deps"
cp "$renders/dev-deps.yaml" "$scan/"
count=$((count + 1))
printf '%d renders\n' "$count"

# Custom resources kubernetes-validate has no schema for (rendered above,
# not schema-checked): the mesh routes and the JetStream streams.
crds='GRPCRoute with api version gateway.networking.k8s.io/v1|VirtualService with api version networking.istio.io/v1|DestinationRule with api version networking.istio.io/v1|Stream with api version jetstream.nats.io/v1beta2'
# The renders share most of their resources: validate each distinct one once.
unique="$work/unique.yaml"
"$bin/python" - "$renders" "$unique" <<'PY'
import pathlib, sys
seen, docs = set(), []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.yaml")):
    for doc in f.read_text().split("\n---\n"):
        doc = doc.strip().removeprefix("---").strip()
        if doc and doc not in seen:
            seen.add(doc)
            docs.append(doc)
pathlib.Path(sys.argv[2]).write_text("\n---\n".join(docs) + "\n")
print(f"{len(docs)} distinct resources")
PY
for version in 1.30.0 1.37.0; do
  say "kubernetes-validate --strict (Kubernetes $version)"
  log="$work/validate-$version.log"
  status=0
  "$bin/kubernetes-validate" --strict --quiet -k "$version" "$unique" >"$log" 2>&1 || status=$?
  unexpected="$(grep -Ev "Couldn't find schema for kind ($crds) for kubernetes version" "$log" || true)"
  if [ "$status" -ne 0 ] || [ -n "$unexpected" ]; then
    printf '%s\n' "$unexpected" >&2
    fail "kubernetes-validate (Kubernetes $version)"
  fi
done

say "mesh routes name rpcs that exist in proto/"
missing=0
while read -r svc method; do
  pkg="${svc%.*}"
  dir="proto/$(printf '%s' "${pkg%.*}" | tr . /)/${pkg##*.}"
  if [ ! -d "$dir" ]; then
    printf '  (not checked: %s/%s, no %s in this tree yet)\n' "$svc" "$method" "$dir"
    continue
  fi
  grep -Eq "^\s*rpc\s+$method\s*\(" "$dir"/*.proto || { printf '  unknown rpc %s/%s\n' "$svc" "$method" >&2; missing=1; }
done < <(grep -h -A2 'type: Exact' "$k8s"/components/linkerd/*-routes.yaml \
  | awk '/service:/ {s=$2} /method:/ && $2 != "" && s != "" {print s, $2; s=""}' | sort -u)
[ "$missing" -eq 0 ] || fail "a mesh route names an rpc that is not in proto/"

# checkov, with these rules skipped:
#   CKV_K8S_43 (image by digest): the digest is set at release time
#     (`kustomize edit set image clm=...@sha256:...`, deploy/README.md);
#     the repository cannot know it.
#   CKV_K8S_35 (secrets as files, not env): the config loader takes the
#     database URLs, the Redis and NATS URLs and the HS256 key from CLM_*
#     environment variables (crates/clm-platform/src/config.rs has no
#     per-key *_file setting for them); they come from secretKeyRef, never
#     from the manifests.
#   CKV_K8S_11 (CPU limits): a CPU limit throttles a latency-sensitive
#     gRPC server by CFS quota even when the node is idle; requests reserve
#     CPU and the HPA scales on it. Memory limits are set.
say "checkov: $(find "$scan" -name '*.yaml' | wc -l) renders holding every resource variant"
"$bin/checkov" --quiet --compact --framework kubernetes --skip-download \
  --skip-check CKV_K8S_43,CKV_K8S_35,CKV_K8S_11 -d "$scan" >"$work/checkov.log" 2>&1 \
  || { cat "$work/checkov.log" >&2; fail "checkov"; }
grep -E '^Passed' "$work/checkov.log" || true

say "deploy checks passed"
