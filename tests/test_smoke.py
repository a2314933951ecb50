import pytest

from django_idempotency.models import IdempotencyKey
from tests.models import Charge

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize("url", ["/sync/", "/sync/lease/", "/async/", "/api/", "/viewset/charges/", "/apiview/"])
def test_smoke(client, url):
    headers = {"Idempotency-Key": "abc"}
    r1 = client.post(url, {"amount": 5}, content_type="application/json", headers=headers)
    r2 = client.post(url, {"amount": 5}, content_type="application/json", headers=headers)
    r3 = client.post(url, {"amount": 6}, content_type="application/json", headers=headers)
    print(r1.status_code, r1.content, r2.status_code, r2.content, r2.headers, r3.status_code, r3.content)
    assert r1.status_code == 201
    assert r2.content == r1.content
    assert r2["Idempotent-Replayed"] == "true"
    assert r3.status_code == 422
    assert Charge.objects.count() == 1
    assert IdempotencyKey.objects.count() == 1
