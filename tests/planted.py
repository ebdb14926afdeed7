"""Secrets the tests plant, as fixed literals: each check looks for these exact strings, so
the product's own patterns are never the oracle. Values under secret-looking keys are plain
strings no pattern could recognise: only the key check can remove them."""

from __future__ import annotations

# Values under secret-looking keys, in the spellings the keys come in.
KEYED = {
    "tool argument api_key": "tool-arg-4f9Qz81",
    "chain input password": "chain-pw-Hx72pLq",
    "chain input Authorization": "chain-auth-Mw51",
    "chain output clientSecret": "chain-out-Kd02nRt",
    "tool output accessToken": "tool-out-Vb38sWm",
    "tool-call input api_key": "toolcall-in-Zc64",
    "tool-call argument apiKey": "call-arg-Rf83kDs",
    "invocation param azureAdToken": "param-Gh26yNe",
    "metadata X-Api-Key": "meta-Jt67uBn",
    "metadata Cookie": "meta-cookie-Lm40cZo",
    "document metadata privateKey": "doc-meta-Pq55vXe",
    "document metadata Ocp-Apim-Subscription-Key": "doc-meta-Ws19aYc",
}
# Credentials inside text: (the text as a user or model writes it, the part that must go).
FORMATS = {
    "url credentials": ("postgres://deploy:Tr0ub4dor-url@db.internal:5432/app", "Tr0ub4dor-url"),
    "password assignment": ("password=Hunter2-assign", "Hunter2-assign"),
    "api_key assignment": ("api_key=ak-assign-93jd", "ak-assign-93jd"),
    "token colon": ("token: tk-colon-55qa", "tk-colon-55qa"),
    "google access token": ("ya29.a0AfH6SMBplantedAccessToken0123456789",
                            "ya29.a0AfH6SMBplantedAccessToken0123456789"),
    "google client secret": ("GOCSPX-plantedClientSecret0123456789",
                             "GOCSPX-plantedClientSecret0123456789"),
    "slack webhook": ("https://hooks.slack.com/services/T0PLANTED/B0PLANTED/webhookSecret0123456",
                      "webhookSecret0123456"),
    "azure connection string": (
        "DefaultEndpointsProtocol=https;AccountName=acme;"
        "AccountKey=c2VjcmV0LWFjY291bnQta2V5LXBsYW50ZWQ=;EndpointSuffix=core.windows.net",
        "c2VjcmV0LWFjY291bnQta2V5LXBsYW50ZWQ="),
    "sql connection string": ("Server=db;User Id=sa;Password=Sql-Pl4nted!;", "Sql-Pl4nted!"),
    "password in an error": ("login failed: password=Err-Pl4nted", "Err-Pl4nted"),
    "short bearer": ("Authorization: Bearer abc123def456", "abc123def456"),
    "short basic": ("Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    "openai key": ("sk-proj-plantedOpenAiKey0123456789", "sk-proj-plantedOpenAiKey0123456789"),
    "aws access key id": ("AKIAPLANTEDX01234567", "AKIAPLANTEDX01234567"),
}  # fmt: skip
# A private key block: each of its lines must go, compared line by line (not as one string
# whose line breaks an encoder would have escaped).
PEM_LINES = ("MIIEplantedPemBodyLineOne0123", "MIIEplantedPemBodyLineTwo4567")
PEM = "-----BEGIN PRIVATE KEY-----\n" + "\n".join(PEM_LINES) + "\n-----END PRIVATE KEY-----"
PLANTED = (*KEYED.values(), *(secret for _, secret in FORMATS.values()), *PEM_LINES)
# The text of the question and of the model's answer: every format, one a line.
LEAKY_TEXT = "Please connect:\n" + "\n".join(text for text, _ in FORMATS.values()) + "\n" + PEM
