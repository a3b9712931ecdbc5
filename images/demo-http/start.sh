#!/bin/busybox sh
# Writes a page naming the deployment, then serves it, logging every request.
# Flotilla sets the FLOTILLA_* variables and PORT in every container it starts.
name="${FLOTILLA_DEPLOYMENT_NAME:-demo}"
version="${DEMO_VERSION:-1}"
port="${PORT:-8080}"
/bin/busybox mkdir -p /www
{
  echo '<!doctype html>'
  echo "<html><head><title>${name} on Flotilla</title></head><body>"
  echo "<h1>Hello from ${name}</h1>"
  echo "<p>Deployment ${name} (${FLOTILLA_DEPLOYMENT_ID:-unknown}), replica ${FLOTILLA_REPLICA_INDEX:-0}, on node ${FLOTILLA_NODE_ID:-unknown}.</p>"
  echo "<p>demo-http version ${version}</p>"
  echo '</body></html>'
} >/www/index.html
echo "demo-http ${version}: serving ${name} on port ${port}"
# For tests of crashes: replica DEMO_CRASH_REPLICA serves for
# DEMO_CRASH_AFTER seconds (0: not at all), then exits with DEMO_CRASH_CODE.
if [ -n "${DEMO_CRASH_REPLICA:-}" ] && [ "${FLOTILLA_REPLICA_INDEX:-0}" = "${DEMO_CRASH_REPLICA}" ]; then
  echo "demo-http: replica ${DEMO_CRASH_REPLICA} exits with code ${DEMO_CRASH_CODE:-3} after ${DEMO_CRASH_AFTER:-0}s" >&2
  /bin/busybox httpd -f -vv -p "${port}" -h /www &
  /bin/busybox sleep "${DEMO_CRASH_AFTER:-0}"
  exit "${DEMO_CRASH_CODE:-3}"
fi
exec /bin/busybox httpd -f -vv -p "${port}" -h /www
