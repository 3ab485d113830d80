import requests


def test_mock_onenet_fixture_answers_detect_for_a_created_task(mock_onenet):
    mock_onenet.service.create_task("527776559", "1.1.0", b"\x01" * 100)
    answer = requests.get(
        f"{mock_onenet.url}/ota/south/check",
        params={"dev_id": "527776559", "type": 2, "version": "1.0.0", "cdn": "true"},
        headers={"Authorization": mock_onenet.authorization()}, timeout=5).json()
    assert answer["errno"] == 0
    assert answer["data"]["size"] == 100
