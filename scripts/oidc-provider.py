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

The first line printed is "listening http://HOST:PORT" (PORT may be 0 to
pick a free one).
"""

import argparse
import logging
import warnings
from datetime import timedelta

warnings.filterwarnings("ignore")

import flask  # noqa: E402
import oidc_provider_mock  # noqa: E402
import werkzeug.serving  # noqa: E402
from authlib import jose  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-max-age", type=int, default=3600, help="seconds")
    args = parser.parse_args()

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

    app.register_blueprint(test)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = werkzeug.serving.make_server(args.host, args.port, app, threaded=True)
    print(f"listening http://{args.host}:{server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
