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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    PyObject *write;
    PyObject *fallback;
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

static PyObject *
forwarder_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    AudioForwarder *self = (AudioForwarder *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *data;
    long long payload;
    PyObject *result;
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
    result = PyObject_CallOneArg(self->write, data);
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);
    self->payload_bytes += (unsigned long long)payload;
    Py_RETURN_NONE;
}

static PyObject *
forwarder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"write", "fallback", "max_payload", NULL};
    PyObject *write, *fallback;
    unsigned long long max_payload;
    AudioForwarder *self;
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OOK", keywords, &write, &fallback, &max_payload)) {
        return NULL;
    }
    if (!PyCallable_Check(write) || !PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "write and fallback must be callable");
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
    return 0;
}

static int
forwarder_clear(AudioForwarder *self)
{
    Py_CLEAR(self->write);
    Py_CLEAR(self->fallback);
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
    {"enabled", T_BOOL, offsetof(AudioForwarder, enabled), 0,
     "Whether whole audio frames may be forwarded here; when false every read goes to fallback."},
    {NULL}
};

static PyTypeObject AudioForwarderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway._relay.AudioForwarder",
    .tp_doc = PyDoc_STR(
        "AudioForwarder(write, fallback, max_payload): a data_received that forwards "
        "reads of whole binary frames with write() and counts them, and passes any other "
        "read to fallback()."),
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

static struct PyModuleDef relay_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "gateway._relay",
    .m_doc = "The relay's compiled fast path for audio frames (see gateway.fastpath).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__relay(void)
{
    PyObject *module;
    if (PyType_Ready(&AudioForwarderType) < 0) {
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
    return module;
}
