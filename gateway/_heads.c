/* The compiled fast path of a session's handshake: the two upgrade heads, read and checked.
 *
 * Every session's handshake reads two HTTP heads: the client's upgrade request and the
 * upstream's 101. On the pure-Python path (gateway.http_head, then gateway.frontdoor's
 * check_upgrade and gateway.upgrade's check_switching) each becomes a websockets Headers,
 * a Request or Response, and a dozen look-ups: most of the gateway's own time on the
 * caller's way to its first audio. These two functions do the same reading and checking in
 * one pass over the bytes, for the heads real clients and servers send, and answer None for
 * anything else (incomplete, malformed, a refusal, a header list, a header given twice, any
 * doubt). None sends the caller to the Python path, so every error, message and status
 * stays the one the Python path makes; tests/test_http_head.py holds the two to the same
 * result on drawn heads.
 *
 * scan_request(data, max_line, max_headers) -> (size, path, key, authorization) | None
 *     A whole upgrade request at the start of data that check_upgrade accepts: GET, HTTP/1.1,
 *     valid header lines (RFC 9110 names and values, as websockets reads them), no body
 *     header, at most one Host and Authorization, exactly one "Connection: Upgrade", one
 *     "Upgrade: websocket" (both in any case), one Sec-WebSocket-Key of 16 bytes in base64
 *     and one "Sec-WebSocket-Version: 13". authorization is None when there is none.
 * scan_switching(data, accept, max_line, max_headers) -> size | None
 *     A whole 101 head at the start of data that check_switching accepts for the request
 *     whose Sec-WebSocket-Accept is `accept` (bytes): one "Connection: Upgrade", one
 *     "Upgrade: websocket", that one accept, no extension and no subprotocol.
 *
 * size is the head's length in bytes, its closing CRLF CRLF included: what follows is the
 * peer's first frames. max_line and max_headers are websockets' limits (its
 * MAX_LINE_LENGTH and MAX_NUM_HEADERS, which its environment can change).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "_heads.h"

/* Character classes of websockets' (RFC 9110) header grammar. */
enum { TCHAR = 1, EDGE = 2, INNER = 4, TARGET = 8 };
static unsigned char classes[256];

static void
init_classes(void)
{
    static const char token_marks[] = "-!#$%&'*+.^_`|~";
    for (int c = 0; c < 256; c++) {
        unsigned char bits = 0;
        if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
            || (c != 0 && strchr(token_marks, c) != NULL)) {
            bits |= TCHAR;
        }
        if ((c >= 0x21 && c <= 0x7e) || c >= 0x80) {
            bits |= EDGE | INNER; /* a value's first and last byte, and any between */
        }
        if (c == ' ' || c == '\t') {
            bits |= INNER;
        }
        if (c >= 0x21 && c <= 0x7e) {
            bits |= TARGET; /* a request target */
        }
        classes[c] = bits;
    }
}

/* The names the checks look at; every other name only has to be valid. */
enum name_id {
    OTHER,
    HOST,
    AUTHORIZATION,
    CONNECTION,
    UPGRADE,
    KEY,
    VERSION,
    ACCEPT,
    EXTENSIONS,
    PROTOCOL,
    BODY, /* Content-Length, Transfer-Encoding: websockets' parser decides */
    NAME_COUNT
};

static const struct {
    const char *lower;
    enum name_id id;
} known_names[] = {
    {"host", HOST},
    {"authorization", AUTHORIZATION},
    {"connection", CONNECTION},
    {"upgrade", UPGRADE},
    {"sec-websocket-key", KEY},
    {"sec-websocket-version", VERSION},
    {"sec-websocket-accept", ACCEPT},
    {"sec-websocket-extensions", EXTENSIONS},
    {"sec-websocket-protocol", PROTOCOL},
    {"content-length", BODY},
    {"transfer-encoding", BODY},
};

/* Whether `text` (`size` bytes) equals the lowercase ASCII `lower`, in any case. */
static int
equals_lower(const unsigned char *text, Py_ssize_t size, const char *lower)
{
    Py_ssize_t i = 0;
    for (; i < size && lower[i] != '\0'; i++) {
        unsigned char c = text[i];
        if (c >= 'A' && c <= 'Z') {
            c = (unsigned char)(c - 'A' + 'a');
        }
        if (c != (unsigned char)lower[i]) {
            return 0;
        }
    }
    return i == size && lower[i] == '\0';
}

static enum name_id
name_of(const unsigned char *name, Py_ssize_t size)
{
    for (size_t i = 0; i < sizeof(known_names) / sizeof(known_names[0]); i++) {
        if (equals_lower(name, size, known_names[i].lower)) {
            return known_names[i].id;
        }
    }
    return OTHER;
}

typedef struct {
    int count[NAME_COUNT];
    const unsigned char *value[NAME_COUNT]; /* the last one's, without blanks around it */
    Py_ssize_t length[NAME_COUNT];
} fields;

/* The end of the line that starts at `at` (its CR), or `end`: a head's lines are bounded by
 * its end, where its blank line's CRLF CRLF starts. */
static const unsigned char *
line_end_of(const unsigned char *at, const unsigned char *end)
{
    while (at < end && !(at[0] == '\r' && at[1] == '\n')) {
        at++;
    }
    return at;
}

/* A head's header lines, from `at` up to `end` (where its blank line starts): each valid
 * and short enough, not too many. 0 if any is not (or names a body). */
static int
read_fields(const unsigned char *at, const unsigned char *end, Py_ssize_t max_line,
            Py_ssize_t max_headers, fields *out)
{
    Py_ssize_t lines = 0;
    memset(out, 0, sizeof(*out));
    while (at < end) {
        const unsigned char *line_end = line_end_of(at, end);
        const unsigned char *name = at, *value, *value_end;
        enum name_id id;
        if (++lines > max_headers || (line_end - at) + 2 > max_line) {
            return 0;
        }
        while (at < line_end && (classes[*at] & TCHAR)) {
            at++;
        }
        if (at == name || at == line_end || *at != ':') {
            return 0;
        }
        id = name_of(name, at - name);
        if (id == BODY) {
            return 0;
        }
        at++;
        while (at < line_end && (*at == ' ' || *at == '\t')) {
            at++;
        }
        value = at;
        for (; at < line_end; at++) {
            if (!(classes[*at] & INNER)) {
                return 0;
            }
        }
        value_end = line_end;
        while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t')) {
            value_end--;
        }
        out->count[id]++;
        out->value[id] = value;
        out->length[id] = value_end - value;
        at = line_end + 2; /* past the CRLF; past `end` only after the last line */
    }
    return 1;
}

/* A whole head at the start of data: its size (its CRLF CRLF included), its first line's end
 * in `first_end`, its header lines in `found`. -1 if it is incomplete, a line is too long or
 * invalid, or there are too many (the first line's own form is the caller's to check). */
static Py_ssize_t
read_head(const unsigned char *data, Py_ssize_t size, Py_ssize_t max_line, Py_ssize_t max_headers,
          const unsigned char **first_end, fields *found)
{
    Py_ssize_t end = 0;
    while (end + 3 < size
           && !(data[end] == '\r' && data[end + 1] == '\n' && data[end + 2] == '\r'
                && data[end + 3] == '\n')) {
        end++;
    }
    if (end + 3 >= size) {
        return -1;
    }
    *first_end = line_end_of(data, data + end);
    if ((*first_end - data) + 2 > max_line
        || !read_fields(*first_end + 2, data + end, max_line, max_headers, found)) {
        return -1;
    }
    return end + 4;
}


static int
one_value_is(const fields *found, enum name_id id, const char *lower)
{
    return found->count[id] == 1 && equals_lower(found->value[id], found->length[id], lower);
}

static int
valid_key(const unsigned char *key, Py_ssize_t size)
{
    if (size != 24 || key[22] != '=' || key[23] != '=') {
        return 0;
    }
    for (int i = 0; i < 22; i++) {
        unsigned char c = key[i];
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
              || c == '+' || c == '/')) {
            return 0;
        }
    }
    return 1;
}

static int
arguments(const char *name, Py_ssize_t nargs, Py_ssize_t expected)
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected, nargs);
        return 0;
    }
    return 1;
}

/* The bytes of a bytes or bytearray argument. */
static int
bytes_of(PyObject *object, const unsigned char **data, Py_ssize_t *size)
{
    if (PyBytes_Check(object)) {
        *data = (const unsigned char *)PyBytes_AS_STRING(object);
        *size = PyBytes_GET_SIZE(object);
        return 1;
    }
    if (PyByteArray_Check(object)) {
        *data = (const unsigned char *)PyByteArray_AS_STRING(object);
        *size = PyByteArray_GET_SIZE(object);
        return 1;
    }
    PyErr_Format(PyExc_TypeError, "expected bytes or bytearray, not %.100s",
                 Py_TYPE(object)->tp_name);
    return 0;
}

static int
limits_of(PyObject *const *args, Py_ssize_t *max_line, Py_ssize_t *max_headers)
{
    *max_line = PyLong_AsSsize_t(args[0]);
    if (*max_line == -1 && PyErr_Occurred()) {
        return 0;
    }
    *max_headers = PyLong_AsSsize_t(args[1]);
    return !(*max_headers == -1 && PyErr_Occurred());
}

static PyObject *
scan_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *data, *line_end, *target;
    Py_ssize_t size, head, max_line, max_headers;
    fields found;
    PyObject *path, *key, *authorization, *result;
    (void)module;
    if (!arguments("scan_request", nargs, 3) || !bytes_of(args[0], &data, &size)
        || !limits_of(args + 1, &max_line, &max_headers)) {
        return NULL;
    }
    head = read_head(data, size, max_line, max_headers, &line_end, &found);
    /* The request line: GET <target> HTTP/1.1 */
    if (head < 0 || line_end - data < 14 || memcmp(data, "GET ", 4) != 0
        || memcmp(line_end - 9, " HTTP/1.1", 9) != 0) {
        Py_RETURN_NONE;
    }
    for (target = data + 4; target < line_end - 9; target++) {
        if (!(classes[*target] & TARGET)) {
            Py_RETURN_NONE;
        }
    }
    /* check_upgrade's checks, for the one form every client sends. */
    if (found.count[HOST] > 1 || found.count[AUTHORIZATION] > 1
        || !one_value_is(&found, CONNECTION, "upgrade") || !one_value_is(&found, UPGRADE, "websocket")
        || found.count[KEY] != 1 || !valid_key(found.value[KEY], found.length[KEY])
        || !one_value_is(&found, VERSION, "13")) {
        Py_RETURN_NONE;
    }
    path = PyUnicode_DecodeASCII((const char *)data + 4, (line_end - 9) - (data + 4), NULL);
    key = PyUnicode_DecodeASCII((const char *)found.value[KEY], found.length[KEY], NULL);
    if (found.count[AUTHORIZATION]) {
        authorization = PyUnicode_DecodeLatin1((const char *)found.value[AUTHORIZATION],
                                               found.length[AUTHORIZATION], NULL);
    }
    else {
        authorization = Py_NewRef(Py_None);
    }
    result = NULL;
    if (path != NULL && key != NULL && authorization != NULL) {
        result = Py_BuildValue("(nOOO)", head, path, key, authorization);
    }
    Py_XDECREF(path);
    Py_XDECREF(key);
    Py_XDECREF(authorization);
    return result;
}

static PyObject *
scan_switching(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *data, *accept, *line_end, *reason;
    Py_ssize_t size, accept_size, head, max_line, max_headers;
    fields found;
    (void)module;
    if (!arguments("scan_switching", nargs, 4) || !bytes_of(args[0], &data, &size)
        || !bytes_of(args[1], &accept, &accept_size)
        || !limits_of(args + 2, &max_line, &max_headers)) {
        return NULL;
    }
    head = read_head(data, size, max_line, max_headers, &line_end, &found);
    /* The status line: HTTP/1.1 101 <reason> */
    if (head < 0 || line_end - data < 13 || memcmp(data, "HTTP/1.1 101 ", 13) != 0) {
        Py_RETURN_NONE;
    }
    for (reason = data + 13; reason < line_end; reason++) {
        if (!(classes[*reason] & INNER)) {
            Py_RETURN_NONE;
        }
    }
    /* check_switching's checks, for the one form every server sends. */
    if (!one_value_is(&found, CONNECTION, "upgrade") || !one_value_is(&found, UPGRADE, "websocket")
        || found.count[ACCEPT] != 1 || found.length[ACCEPT] != accept_size
        || memcmp(found.value[ACCEPT], accept, (size_t)accept_size) != 0
        || found.count[EXTENSIONS] != 0 || found.count[PROTOCOL] != 0) {
        Py_RETURN_NONE;
    }
    return PyLong_FromSsize_t(head);
}

PyMethodDef heads_methods[] = {
    {"scan_request", (PyCFunction)(void (*)(void))scan_request, METH_FASTCALL,
     "scan_request(data, max_line, max_headers): (size, path, key, authorization) or None."},
    {"scan_switching", (PyCFunction)(void (*)(void))scan_switching, METH_FASTCALL,
     "scan_switching(data, accept, max_line, max_headers): the 101's size, or None."},
    {NULL, NULL, 0, NULL},
};

void
heads_init(void)
{
    init_classes();
}
