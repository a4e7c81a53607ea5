/* The relay's compiled fast path: audio from the upstream, forwarded and counted in C.
 *
 * A spliced session spends almost all its life streaming audio: each read from the
 * upstream is one or more whole binary frames, to be written to the client unchanged and
 * counted. The pure-Python path (gateway.splice, gateway.wire) scans such a read with a
 * handful of Python calls; this module does the same check in C, so that uvloop's read
 * callback goes straight to the client's transport.write.
 *
 * AudioForwarder(write, fallback, max_payload) is installed as the upstream hop's
 * data_received. While its `enabled` is true (set by gateway.splice only when the frame
 * scanner is between frames with nothing held or pending and the meter only counts audio),
 * a read made of nothing but whole, final, unmasked binary frames of at most max_payload
 * bytes is written with write(data), its payload size added to `payload_bytes`, and
 * `last_read` set to time.monotonic() (kept in the struct: no Python object is made or
 * stored per read). Any other read, and every read while not enabled, goes to
 * fallback(data) untouched: the Python scanner sees exactly the stream it would have seen
 * without this module, so every check it makes still applies.
 *
 * Given the client's socket (fd, with its transport's is_closing and
 * get_write_buffer_size), a forwarded read is sent on it with send() while the transport
 * is open and holds nothing unsent, so nothing can be reordered or sent on a descriptor
 * the transport has closed (and the OS may have reused); what send() leaves, or refuses,
 * goes to write() as before, so the transport buffers it, applies backpressure, or reports
 * the error (a reset that send() met first reaches it as a broken pipe; the splice does not
 * tell the two apart). This saves the transport's write path and the VFS layer around
 * every audio frame (the client's side is plain TCP: never given for TLS). The caller
 * must not half-close the transport (write_eof) while the forwarder may run: uvloop shuts
 * the socket down a loop turn later and shows no state meanwhile; the gateway only
 * half-closes a caller's socket to answer an error, before any splice.
 *
 * TLSReader(feed, read, incoming, outgoing, deliver, fallback, on_error, flush, want_read) is
 * installed as the data_received of an upstream's TLS layer (gateway.upstream_tls) over its
 * plain socket: each read of the socket is fed to the memory BIO and every whole record is
 * read out and handed to deliver, with no Python frame between them (one record per audio
 * frame). While its `enabled` is false (the layer sets it: handshake not done, reading
 * paused, the peer's close_notify passed on, closing), every read goes to fallback, the
 * layer's Python path, untouched. A read that the TLS layer must act on goes to Python
 * too: close_notify (an empty read) to fallback(b""), which reads it again and passes the
 * end on, and an error other than "want read" (a record that fails to decrypt) to
 * on_error(exception). Records stop at once when deliver leaves `enabled` false (the
 * application paused reading); what is left stays in the BIO. flush() is called when the
 * reads left TLS output to send (an answer to a key update).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <time.h>
#include <errno.h>
#include <sys/socket.h>

#include "_heads.h"

typedef struct {
    PyObject_HEAD
    PyObject *write;
    PyObject *fallback;
    PyObject *closing;  /* the client transport's is_closing (with fd) */
    PyObject *buffered; /* the client transport's get_write_buffer_size (with fd) */
    int fd;             /* the client's socket, or -1: everything goes through write */
    unsigned long long max_payload;
    unsigned long long payload_bytes;
    double last_read; /* time.monotonic() of the last read forwarded here, 0 before one */
    int enabled;
    vectorcallfunc vectorcall;
} AudioForwarder;

/* The payload size of `data` if it is nothing but whole binary frames a server may send
 * (FIN, no reserved bits, no mask) each at most `max` bytes long, else -1. */
static long long
audio_payload(const unsigned char *data, Py_ssize_t size, unsigned long long max)
{
    Py_ssize_t pos = 0;
    unsigned long long total = 0;
    if (size <= 0) {
        return -1;
    }
    while (pos < size) {
        Py_ssize_t left = size - pos;
        Py_ssize_t header = 2;
        unsigned long long length;
        if (left < 2 || data[pos] != 0x82) {
            return -1;
        }
        length = data[pos + 1];
        if (length & 0x80) { /* masked: the scanner fails the hop */
            return -1;
        }
        if (length == 126) {
            if (left < 4) {
                return -1;
            }
            length = ((unsigned long long)data[pos + 2] << 8) | data[pos + 3];
            header = 4;
        }
        else if (length == 127) {
            if (left < 10) {
                return -1;
            }
            length = 0;
            for (int i = 2; i < 10; i++) {
                length = (length << 8) | data[pos + i];
            }
            header = 10;
        }
        if (length > max || length > (unsigned long long)(left - header)) {
            return -1; /* too big for the scanner's bound, or cut by the end of the read */
        }
        pos += header + (Py_ssize_t)length;
        total += length;
    }
    return (long long)total;
}

static double
monotonic(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now); /* the clock of time.monotonic() */
    return (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
}

/* Whether `data` may be sent on the client's socket directly now: 1, 0, or -1 (error). */
static int
may_send_directly(AudioForwarder *self)
{
    PyObject *result;
    Py_ssize_t pending;
    int closing;
    if (self->fd < 0) {
        return 0;
    }
    result = PyObject_CallNoArgs(self->closing);
    if (result == NULL) {
        return -1;
    }
    closing = PyObject_IsTrue(result);
    Py_DECREF(result);
    if (closing != 0) {
        return closing < 0 ? -1 : 0;
    }
    result = PyObject_CallNoArgs(self->buffered);
    if (result == NULL) {
        return -1;
    }
    pending = PyLong_AsSsize_t(result);
    Py_DECREF(result);
    if (pending == -1 && PyErr_Occurred()) {
        return -1;
    }
    return pending == 0;
}

/* Write `data` to the client: as much as send() takes, the rest (or all) with write(). */
static int
forward(AudioForwarder *self, PyObject *data)
{
    const char *bytes = PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    Py_ssize_t sent = 0;
    PyObject *rest, *result;
    int direct = may_send_directly(self);
    if (direct < 0) {
        return -1;
    }
    if (direct) {
        sent = send(self->fd, bytes, (size_t)size, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent == size) {
            return 0;
        }
        if (sent < 0) { /* full (EAGAIN) or failed: the transport's write says what follows */
            sent = 0;
        }
    }
    if (sent == 0) {
        result = PyObject_CallOneArg(self->write, data);
    }
    else {
        rest = PyBytes_FromStringAndSize(bytes + sent, size - sent);
        if (rest == NULL) {
            return -1;
        }
        result = PyObject_CallOneArg(self->write, rest);
        Py_DECREF(rest);
    }
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

static PyObject *
forwarder_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    AudioForwarder *self = (AudioForwarder *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *data;
    long long payload;
    if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "AudioForwarder takes one argument: the bytes read");
        return NULL;
    }
    data = args[0];
    if (!self->enabled || !PyBytes_CheckExact(data)) {
        return PyObject_CallOneArg(self->fallback, data);
    }
    payload = audio_payload(
        (const unsigned char *)PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), self->max_payload
    );
    if (payload < 0) {
        return PyObject_CallOneArg(self->fallback, data);
    }
    self->last_read = monotonic();
    if (forward(self, data) < 0) {
        return NULL;
    }
    self->payload_bytes += (unsigned long long)payload;
    Py_RETURN_NONE;
}

static PyObject *
forwarder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "write", "fallback", "max_payload", "fd", "closing", "buffered", NULL};
    PyObject *write, *fallback, *closing = NULL, *buffered = NULL;
    unsigned long long max_payload;
    int fd = -1;
    AudioForwarder *self;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OOK|$iOO", keywords, &write, &fallback, &max_payload, &fd, &closing,
            &buffered)) {
        return NULL;
    }
    if (!PyCallable_Check(write) || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "write and fallback must be callable");
        return NULL;
    }
    if (fd >= 0 && (closing == NULL || buffered == NULL || !PyCallable_Check(closing)
                    || !PyCallable_Check(buffered))) {
        PyErr_SetString(PyExc_TypeError, "fd needs closing and buffered, both callable");
        return NULL;
    }
    self = (AudioForwarder *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    Py_INCREF(write);
    Py_INCREF(fallback);
    self->write = write;
    self->fallback = fallback;
    self->fd = fd < 0 ? -1 : fd;
    self->closing = NULL;
    self->buffered = NULL;
    if (self->fd >= 0) {
        Py_INCREF(closing);
        Py_INCREF(buffered);
        self->closing = closing;
        self->buffered = buffered;
    }
    self->max_payload = max_payload;
    self->payload_bytes = 0;
    self->last_read = 0.0;
    self->enabled = 0;
    self->vectorcall = forwarder_vectorcall;
    return (PyObject *)self;
}

static int
forwarder_traverse(AudioForwarder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->write);
    Py_VISIT(self->fallback);
    Py_VISIT(self->closing);
    Py_VISIT(self->buffered);
    return 0;
}

static int
forwarder_clear(AudioForwarder *self)
{
    Py_CLEAR(self->write);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->closing);
    Py_CLEAR(self->buffered);
    return 0;
}

static void
forwarder_dealloc(AudioForwarder *self)
{
    PyObject_GC_UnTrack(self);
    forwarder_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef forwarder_members[] = {
    {"payload_bytes", T_ULONGLONG, offsetof(AudioForwarder, payload_bytes), 0,
     "Payload bytes of the frames forwarded on the fast path (the caller resets it)."},
    {"last_read", T_DOUBLE, offsetof(AudioForwarder, last_read), READONLY,
     "time.monotonic() of the last read forwarded here (0.0 before the first)."},
    {"fd", T_INT, offsetof(AudioForwarder, fd), READONLY,
     "The client's socket the forwarder sends on itself, or -1 (everything through write)."},
    {"enabled", T_BOOL, offsetof(AudioForwarder, enabled), 0,
     "Whether whole audio frames may be forwarded here; when false every read goes to fallback."},
    {NULL}
};

static PyTypeObject AudioForwarderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._relay.AudioForwarder",
    .tp_doc = PyDoc_STR(
        "AudioForwarder(write, fallback, max_payload, *, fd=-1, closing=None, buffered=None): "
        "a data_received that forwards reads of whole binary frames with write() (or send() "
        "on fd while closing() is false and buffered() is 0) and counts them, and passes any "
        "other read to fallback()."),
    .tp_basicsize = sizeof(AudioForwarder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = forwarder_new,
    .tp_dealloc = (destructor)forwarder_dealloc,
    .tp_traverse = (traverseproc)forwarder_traverse,
    .tp_clear = (inquiry)forwarder_clear,
    .tp_members = forwarder_members,
    .tp_vectorcall_offset = offsetof(AudioForwarder, vectorcall),
    .tp_call = PyVectorcall_Call,
};

typedef struct {
    PyObject_HEAD
    PyObject *feed;      /* the incoming BIO's write */
    PyObject *read;      /* the TLS object's read(size) */
    PyObject *incoming;  /* the incoming BIO (its pending) */
    PyObject *outgoing;  /* the outgoing BIO (its pending) */
    PyObject *deliver;   /* the application's data_received */
    PyObject *fallback;  /* the layer's Python data_received */
    PyObject *on_error;  /* the layer's handler of a failed read */
    PyObject *flush;     /* sends what the outgoing BIO holds */
    PyObject *want_read; /* ssl.SSLWantReadError */
    PyObject *size;      /* the most one read returns: a record's plaintext */
    int enabled;
    vectorcallfunc vectorcall;
} TLSReader;

static PyObject *pending_name; /* "pending", interned */

/* A BIO's pending byte count, or -1 with an exception set. */
static long long
bio_pending(PyObject *bio)
{
    PyObject *value = PyObject_GetAttr(bio, pending_name);
    long long count;
    if (value == NULL) {
        return -1;
    }
    count = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return count;
}

static PyObject *
reader_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TLSReader *self = (TLSReader *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *data, *result;
    long long left;
    if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "TLSReader takes one argument: the bytes read");
        return NULL;
    }
    data = args[0];
    if (!self->enabled || !PyBytes_CheckExact(data)) {
        return PyObject_CallOneArg(self->fallback, data);
    }
    result = PyObject_CallOneArg(self->feed, data);
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);
    while (self->enabled) {
        PyObject *plain = PyObject_CallOneArg(self->read, self->size);
        if (plain == NULL) {
            PyObject *type, *value, *traceback;
            if (PyErr_ExceptionMatches(self->want_read)) {
                PyErr_Clear(); /* no whole record left */
                break;
            }
            PyErr_Fetch(&type, &value, &traceback);
            PyErr_NormalizeException(&type, &value, &traceback);
            if (traceback != NULL && value != NULL) {
                PyException_SetTraceback(value, traceback);
            }
            Py_XDECREF(type);
            Py_XDECREF(traceback);
            if (value == NULL) {
                return NULL;
            }
            result = PyObject_CallOneArg(self->on_error, value);
            Py_DECREF(value);
            return result;
        }
        if (!PyBytes_Check(plain) || PyBytes_GET_SIZE(plain) == 0) {
            PyObject *empty;
            Py_DECREF(plain); /* close_notify: the layer reads it again and passes the end on */
            empty = PyBytes_FromStringAndSize(NULL, 0);
            if (empty == NULL) {
                return NULL;
            }
            result = PyObject_CallOneArg(self->fallback, empty);
            Py_DECREF(empty);
            return result;
        }
        result = PyObject_CallOneArg(self->deliver, plain);
        Py_DECREF(plain);
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
        left = bio_pending(self->incoming); /* a read returns one record: stop when none is left */
        if (left < 0) {
            return NULL;
        }
        if (left == 0) {
            break;
        }
    }
    left = bio_pending(self->outgoing);
    if (left < 0) {
        return NULL;
    }
    if (left > 0) {
        return PyObject_CallNoArgs(self->flush);
    }
    Py_RETURN_NONE;
}

static PyObject *
reader_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "feed", "read", "incoming", "outgoing", "deliver", "fallback", "on_error", "flush",
        "want_read", "size", NULL};
    PyObject *feed, *read, *incoming, *outgoing, *deliver, *fallback, *on_error, *flush;
    PyObject *want_read;
    Py_ssize_t size;
    TLSReader *self;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OOOOOOOOOn", keywords, &feed, &read, &incoming, &outgoing,
            &deliver, &fallback, &on_error, &flush, &want_read, &size)) {
        return NULL;
    }
    if (!PyCallable_Check(feed) || !PyCallable_Check(read) || !PyCallable_Check(deliver)
        || !PyCallable_Check(fallback) || !PyCallable_Check(on_error)
        || !PyCallable_Check(flush)) {
        PyErr_SetString(PyExc_TypeError, "feed, read, deliver, fallback, on_error and flush "
                                         "must be callable");
        return NULL;
    }
    if (!PyExceptionClass_Check(want_read) || size <= 0) {
        PyErr_SetString(PyExc_TypeError, "want_read must be an exception class, size positive");
        return NULL;
    }
    self = (TLSReader *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->size = PyLong_FromSsize_t(size);
    if (self->size == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(feed);
    Py_INCREF(read);
    Py_INCREF(incoming);
    Py_INCREF(outgoing);
    Py_INCREF(deliver);
    Py_INCREF(fallback);
    Py_INCREF(on_error);
    Py_INCREF(flush);
    Py_INCREF(want_read);
    self->feed = feed;
    self->read = read;
    self->incoming = incoming;
    self->outgoing = outgoing;
    self->deliver = deliver;
    self->fallback = fallback;
    self->on_error = on_error;
    self->flush = flush;
    self->want_read = want_read;
    self->enabled = 0;
    self->vectorcall = reader_vectorcall;
    return (PyObject *)self;
}

static int
reader_traverse(TLSReader *self, visitproc visit, void *arg)
{
    Py_VISIT(self->feed);
    Py_VISIT(self->read);
    Py_VISIT(self->incoming);
    Py_VISIT(self->outgoing);
    Py_VISIT(self->deliver);
    Py_VISIT(self->fallback);
    Py_VISIT(self->on_error);
    Py_VISIT(self->flush);
    Py_VISIT(self->want_read);
    return 0;
}

static int
reader_clear(TLSReader *self)
{
    Py_CLEAR(self->feed);
    Py_CLEAR(self->read);
    Py_CLEAR(self->incoming);
    Py_CLEAR(self->outgoing);
    Py_CLEAR(self->deliver);
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->flush);
    Py_CLEAR(self->want_read);
    return 0;
}

static void
reader_dealloc(TLSReader *self)
{
    PyObject_GC_UnTrack(self);
    reader_clear(self);
    Py_CLEAR(self->size);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
reader_get_deliver(TLSReader *self, void *closure)
{
    Py_INCREF(self->deliver);
    return self->deliver;
}

static int
reader_set_deliver(TLSReader *self, PyObject *value, void *closure)
{
    if (value == NULL || !PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "deliver must be callable");
        return -1;
    }
    Py_INCREF(value);
    Py_SETREF(self->deliver, value);
    return 0;
}

static PyGetSetDef reader_getset[] = {
    {"deliver", (getter)reader_get_deliver, (setter)reader_set_deliver,
     "Where decrypted records go: the application protocol's data_received.", NULL},
    {NULL}
};

static PyMemberDef reader_members[] = {
    {"enabled", T_BOOL, offsetof(TLSReader, enabled), 0,
     "Whether records are read here; when false every read goes to fallback."},
    {NULL}
};

static PyTypeObject TLSReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._relay.TLSReader",
    .tp_doc = PyDoc_STR(
        "TLSReader(feed, read, incoming, outgoing, deliver, fallback, on_error, flush, "
        "want_read, size): a TLS layer's data_received that feeds each socket read to the "
        "memory BIO and hands every whole record to deliver()."),
    .tp_basicsize = sizeof(TLSReader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = reader_new,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_traverse = (traverseproc)reader_traverse,
    .tp_clear = (inquiry)reader_clear,
    .tp_members = reader_members,
    .tp_getset = reader_getset,
    .tp_vectorcall_offset = offsetof(TLSReader, vectorcall),
    .tp_call = PyVectorcall_Call,
};

static struct PyModuleDef relay_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gateway._relay",
    .m_doc = "The gateway's compiled fast path: audio frames, TLS records, the handshake's heads "
             "(see gateway.fastpath).",
    .m_size = -1,
    .m_methods = heads_methods,
};

PyMODINIT_FUNC
PyInit__relay(void)
{
    PyObject *module;
    if (PyType_Ready(&AudioForwarderType) < 0 || PyType_Ready(&TLSReaderType) < 0) {
        return NULL;
    }
    heads_init();
    pending_name = PyUnicode_InternFromString("pending");
    if (pending_name == NULL) {
        return NULL;
    }
    module = PyModule_Create(&relay_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&AudioForwarderType);
    if (PyModule_AddObject(module, "AudioForwarder", (PyObject *)&AudioForwarderType) < 0) {
        Py_DECREF(&AudioForwarderType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&TLSReaderType);
    if (PyModule_AddObject(module, "TLSReader", (PyObject *)&TLSReaderType) < 0) {
        Py_DECREF(&TLSReaderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
