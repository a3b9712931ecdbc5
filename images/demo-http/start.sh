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
exec /bin/busybox httpd -f -vv -p "${port}" -h /www
