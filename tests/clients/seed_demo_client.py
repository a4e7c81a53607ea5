# -*- coding: utf-8 -*-
# The Python3 demo client from Huawei's rtts API page (tests/data/rtts-api-page.txt), kept as published
# except for three marked changes so a test can drive it: the URL, text and config come
# from arguments, what it receives is recorded, and instead of sleeping 10 s it waits for
# END (at most 10 s). Its library is websocket-client, as on the page.
import websocket
import threading
import time
import json


def rtts_demo(url, text, config, received):  # CHANGED: parameters instead of placeholders
    token = 'Token of the region corresponding to the user'
    header = {
        'X-Auth-Token': token
    }
    body = {
        'command': 'START',
        'text': text,
        'config': config,  # CHANGED: was {'audio_format': 'pcm', 'property': 'chinese_xiaoyu_common', 'sample_rate': '8000'}
    }
    done = threading.Event()

    def _on_message(ws, message):
        received.append(message)  # CHANGED: record instead of only printing
        if isinstance(message, bytes):
            print('receive data length %d' % len(message))
        else:
            print(message)
            if json.loads(message).get('resp_type') in ('END', 'ERROR', 'FATAL_ERROR'):
                done.set()

    def _on_error(ws, error):
        print(error)

    ws = websocket.WebSocketApp(url, header, on_message=_on_message, on_error=_on_error)
    _thread = threading.Thread(target=ws.run_forever, args=(None, None, 30, 20))
    _thread.start()
    time.sleep(1)
    ws.send(json.dumps(body), opcode=websocket.ABNF.OPCODE_TEXT)
    done.wait(10)  # CHANGED: was time.sleep(10)
    ws.close()
    _thread.join(5)
