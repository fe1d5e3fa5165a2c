"""The baseline for scripts/bench/ingest.py: the same route as the real webhook endpoint
doing nothing but read the body and answer 200 JSON, so the difference is the service's
own work. Run under the project's gunicorn config:

    gunicorn -c gunicorn.conf.py --pythonpath scripts/bench bare_app:app
"""

from flask import Flask, request

app = Flask(__name__)


@app.post("/webhooks/replicate")
def replicate() -> tuple[dict, int]:
    request.get_data()
    return {"status": "recorded", "position": 0}, 200
