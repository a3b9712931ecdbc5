"""A real OpenID Connect provider for tests and development.

It is oidc-provider-mock from PyPI (installed by scripts/dev-services.sh into
a virtualenv), unchanged, plus two endpoints under /_test that only a test
harness needs:

  POST /_test/sign        {"claims": {...}, "header": {...}} -> {"token": "<jwt>"}
      signs any claims with the provider's current key, so tests can make
      tokens a real provider would issue only at other times (expired, not
      yet valid) with a genuine signature;
  POST /_test/rotate-key  -> {"kid": "..."}
      replaces the provider's signing key, as a key rotation does.

and the device authorization grant (RFC 8628), which oidc-provider-mock
lacks, so that `flo login` can be tested against the flow real providers
offer; its tokens are the mock's own (an ID token signed with its key, an
access token its userinfo endpoint knows):

  device_authorization_endpoint  POST /_test/device/authorize
  verification page              GET/POST /_test/device (user_code, sub,
                                 email, action=allow|deny), as a browser posts
  token endpoint                 the mock's /oauth2/token, with
                                 grant_type=urn:ietf:params:oauth:grant-type:device_code

The first line printed is "listening http://HOST:PORT" (PORT may be 0 to
pick a free one).
"""

import argparse
import html
import logging
import os
import secrets
import threading
import time
import warnings
from datetime import datetime, timedelta, timezone

warnings.filterwarnings("ignore")

import flask  # noqa: E402
import oidc_provider_mock  # noqa: E402
import werkzeug.serving  # noqa: E402
from authlib import jose  # noqa: E402
from oidc_provider_mock._storage import AccessToken, User  # noqa: E402

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEVICE_CODE_LIFETIME = 600
DEVICE_POLL_INTERVAL = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-max-age", type=int, default=3600, help="seconds")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        # authlib allows plain HTTP only on loopback; a test provider reached
        # by containers (on a Docker bridge's address) is plain HTTP too.
        os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"

    app = oidc_provider_mock.app(access_token_max_age=timedelta(seconds=args.token_max_age))
    test = flask.Blueprint("flotilla_test", __name__, url_prefix="/_test")

    def storage():
        return flask.g.oidc_provider_mock_storage

    @test.post("/sign")
    def sign():
        body = flask.request.get_json()
        key = storage().jwk
        header = {"alg": "RS256", "kid": key.thumbprint(), **body.get("header", {})}
        token = jose.jwt.encode(header, body["claims"], key)
        return flask.jsonify({"token": token.decode()})

    @test.post("/rotate-key")
    def rotate_key():
        storage().jwk = jose.RSAKey.generate_key(is_private=True)
        return flask.jsonify({"kid": storage().jwk.thumbprint()})

    devices = {}  # device_code -> state
    devices_lock = threading.Lock()

    def oauth_error(error, description, status=400):
        response = flask.jsonify({"error": error, "error_description": description})
        response.status_code = status
        return response

    @test.post("/device/authorize")
    def device_authorize():
        client_id = flask.request.form.get("client_id", "")
        if not client_id:
            return oauth_error("invalid_request", "client_id is required")
        device_code = secrets.token_urlsafe(32)
        user_code = "-".join(secrets.token_hex(2).upper() for _ in range(2))
        with devices_lock:
            devices[device_code] = {
                "user_code": user_code,
                "client_id": client_id,
                "scope": flask.request.form.get("scope", "openid"),
                "expires_at": time.time() + DEVICE_CODE_LIFETIME,
                "status": "pending",
                "last_poll": 0.0,
            }
        page = flask.request.host_url.rstrip("/") + "/_test/device"
        return flask.jsonify({
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": page,
            "verification_uri_complete": f"{page}?user_code={user_code}",
            "expires_in": DEVICE_CODE_LIFETIME,
            "interval": DEVICE_POLL_INTERVAL,
        })

    @test.route("/device", methods=["GET", "POST"])
    def device_page():
        if flask.request.method == "GET":
            code = flask.request.args.get("user_code", "")
            return (
                "<form method=post>code <input name=user_code value='" + html.escape(code, quote=True) + "'>"
                " subject <input name=sub> email <input name=email>"
                " <button name=action value=allow>Allow</button>"
                " <button name=action value=deny>Deny</button></form>"
            )
        form = flask.request.form
        with devices_lock:
            state = next((d for d in devices.values() if d["user_code"] == form.get("user_code")), None)
            if state is None or state["status"] != "pending":
                return "unknown or used code", 404
            if form.get("action") == "deny":
                state["status"] = "denied"
            else:
                state.update(status="approved", sub=form["sub"], email=form.get("email", ""))
        return "done"

    @app.before_request
    def device_token():
        request = flask.request
        if request.path != "/oauth2/token" or request.form.get("grant_type") != DEVICE_GRANT:
            return None
        with devices_lock:
            state = devices.get(request.form.get("device_code", ""))
            if state is None or state["client_id"] != request.form.get("client_id"):
                return oauth_error("invalid_grant", "unknown device code")
            now = time.time()
            if now > state["expires_at"]:
                return oauth_error("expired_token", "the device code expired")
            if now - state["last_poll"] < DEVICE_POLL_INTERVAL * 0.9:
                state["last_poll"] = now
                return oauth_error("slow_down", "polling faster than the interval")
            state["last_poll"] = now
            if state["status"] == "pending":
                return oauth_error("authorization_pending", "not approved yet")
            if state["status"] != "approved":
                return oauth_error("access_denied", "the user denied the request")
            state["status"] = "used"
        sub, email = state["sub"], state["email"]
        issued = int(now)
        storage().store_user(User(sub=sub, claims={"email": email}))
        access_token = secrets.token_urlsafe(32)
        storage().store_access_token(AccessToken(
            token=access_token, user_id=sub, scope=state["scope"],
            expires_at=datetime.now(timezone.utc) + timedelta(seconds=args.token_max_age),
        ))
        key = storage().jwk
        claims = {
            "iss": request.host_url.rstrip("/"), "sub": sub, "aud": state["client_id"], "email": email,
            "iat": issued, "exp": issued + args.token_max_age,
        }
        id_token = jose.jwt.encode({"alg": "RS256", "kid": key.thumbprint()}, claims, key).decode()
        return flask.jsonify({
            "access_token": access_token, "token_type": "Bearer", "expires_in": args.token_max_age,
            "id_token": id_token, "scope": state["scope"],
        })

    @app.after_request
    def announce_device_endpoint(response):
        if flask.request.path == "/.well-known/openid-configuration" and response.status_code == 200:
            document = response.get_json()
            base = flask.request.host_url.rstrip("/")
            document["device_authorization_endpoint"] = base + "/_test/device/authorize"
            document["grant_types_supported"] = [*document.get("grant_types_supported", []), DEVICE_GRANT]
            response = flask.jsonify(document)
        return response

    app.register_blueprint(test)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = werkzeug.serving.make_server(args.host, args.port, app, threaded=True)
    print(f"listening http://{args.host}:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
