// Copyright 2021 Contributors to the Parsec project.
// SPDX-License-Identifier: Apache-2.0
//! Single-part encryption and decryption with one call into a buffer of a given size, and
//! attribute reads in one call (keybroker patch: not in cryptoki 0.12.1; see
//! `Session::encrypt_sized` and `Session::get_attributes_sized`).

use crate::context::Function;
use crate::error::{Error, Result, Rv, RvError};
use crate::mechanism::Mechanism;
use crate::object::{Attribute, AttributeType, ObjectHandle};
use crate::session::Session;
use cryptoki_sys::*;
use secrecy::zeroize::Zeroize;
use std::convert::TryInto;

/// `C_EncryptInit` and `C_DecryptInit` (the same signature).
type InitFn = unsafe extern "C" fn(CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE) -> CK_RV;
/// `C_Encrypt` and `C_Decrypt` (the same signature).
type CallFn = unsafe extern "C" fn(
    CK_SESSION_HANDLE,
    CK_BYTE_PTR,
    CK_ULONG,
    CK_BYTE_PTR,
    CK_ULONG_PTR,
) -> CK_RV;

/// The two functions of one kind of single-part operation, and their names for errors.
pub(super) struct SinglePart {
    pub(super) init: InitFn,
    pub(super) call: CallFn,
    pub(super) init_fn: Function,
    pub(super) call_fn: Function,
}

impl Session {
    /// `init`, then one `call` into a buffer of `capacity` bytes. On `CKR_BUFFER_TOO_SMALL` the
    /// operation stays active and the token has set the size it needs (PKCS #11 2.40 §5.2): one
    /// more call with that size. If that is still too small, the operation is ended (see
    /// [`Session::end_single_part`]) before the error is returned, so that the session can be
    /// used again. The output buffer is erased on every error (it may hold part of a plaintext).
    pub(super) fn single_part_sized(
        &self,
        op: SinglePart,
        mechanism: &Mechanism,
        key: ObjectHandle,
        input: &[u8],
        capacity: usize,
    ) -> Result<Vec<u8>> {
        let mut mechanism: CK_MECHANISM = mechanism.into();
        // Every conversion that can fail is made before the operation starts.
        let input_len: CK_ULONG = input.len().try_into()?;
        let _: CK_ULONG = capacity.try_into()?;
        let mut out = vec![0; capacity];
        let result = self.single_part_into(&op, &mut mechanism, key, input, input_len, &mut out);
        match result {
            Ok(len) => {
                out.truncate(len);
                Ok(out)
            }
            Err(e) => {
                out.zeroize();
                Err(e)
            }
        }
    }

    fn single_part_into(
        &self,
        op: &SinglePart,
        mechanism: &mut CK_MECHANISM,
        key: ObjectHandle,
        input: &[u8],
        input_len: CK_ULONG,
        out: &mut Vec<u8>,
    ) -> Result<usize> {
        let init = |mechanism: &mut CK_MECHANISM| {
            // SAFETY: `mechanism` (and the parameters it points to) outlive the call.
            Rv::from(unsafe { (op.init)(self.handle(), mechanism, key.handle()) })
                .into_result(op.init_fn)
        };
        let call = |out: &mut Vec<u8>| -> Result<(Rv, usize)> {
            let mut out_len: CK_ULONG = out.len().try_into()?;
            // SAFETY: the token reads `input_len` bytes from `input` and writes at most
            // `out_len` (= `out.len()`) bytes to `out`; both outlive the call.
            let rv = Rv::from(unsafe {
                (op.call)(
                    self.handle(),
                    input.as_ptr() as *mut u8,
                    input_len,
                    out.as_mut_ptr(),
                    &mut out_len,
                )
            });
            Ok((rv, out_len.try_into().unwrap_or(usize::MAX)))
        };

        init(mechanism)?;
        // The operation is active until a C_Encrypt/C_Decrypt ends it, which every one does
        // unless it returns CKR_BUFFER_TOO_SMALL (or answers a length query). From here every
        // path either makes such a call or ends the operation itself.
        let (mut rv, mut len) = call(out)?;
        if rv == Rv::Error(RvError::BufferTooSmall) {
            if len <= out.len() || len == usize::MAX {
                // The token asked for no more than it had: it cannot be satisfied.
                self.end_single_part(op, input, input_len)?;
                return Err(Error::Pkcs11(RvError::BufferTooSmall, op.call_fn));
            }
            regrow(out, len);
            (rv, len) = call(out)?;
            if rv == Rv::Error(RvError::OperationNotInitialized) {
                // Kryoptic 1.5.4 (its AES modes) marks the operation used before it checks the
                // buffer, so after CKR_BUFFER_TOO_SMALL the next call fails with
                // CKR_OPERATION_NOT_INITIALIZED (which ends the operation). Start again, once,
                // with the size now known. (Redoing an AES-GCM encryption with the same key, IV
                // and input gives the same output: nothing new is revealed.)
                init(mechanism)?;
                (rv, len) = call(out)?;
            }
            if rv == Rv::Error(RvError::BufferTooSmall) {
                // Too small twice: the token under-reports the size it needs.
                self.end_single_part(op, input, input_len)?;
                return Err(Error::Pkcs11(RvError::BufferTooSmall, op.call_fn));
            }
        }
        rv.into_result(op.call_fn)?;
        Ok(len.min(out.len()))
    }

    /// Ends the active single-part operation of `op`, after a `CKR_BUFFER_TOO_SMALL` that will
    /// not be retried. Returns `CKR_OPERATION_ACTIVE` (as an error of `op.call_fn`) when the
    /// token could not be made to end it: the caller must then close the session rather than
    /// use it again.
    ///
    /// 1. PKCS #11 3.0 and later: `C_EncryptInit`/`C_DecryptInit` with a NULL mechanism ends the
    ///    active operation. Asked only of a library that reports version 3 or later (a 2.x
    ///    module may dereference the NULL; SoftHSM2 2.6.1 is 2.40).
    /// 2. Otherwise, finish it: a length query (which leaves the operation active), then one
    ///    call into a buffer of that size. The output is erased unread. Any error other than
    ///    `CKR_BUFFER_TOO_SMALL` also ends the operation (PKCS #11 2.40 §5.2).
    fn end_single_part(&self, op: &SinglePart, input: &[u8], input_len: CK_ULONG) -> Result<()> {
        let v3 = self
            .client()
            .get_library_info()
            .is_ok_and(|i| i.cryptoki_version().major() >= 3);
        // SAFETY: a NULL mechanism is how PKCS #11 3.x asks to end the operation.
        if v3
            && unsafe { (op.init)(self.handle(), std::ptr::null_mut(), CK_INVALID_HANDLE) }
                == CKR_OK
        {
            return Ok(());
        }
        let still_active = Err(Error::Pkcs11(RvError::OperationActive, op.call_fn));
        let mut len: CK_ULONG = 0;
        // SAFETY: a length query: the token reads `input` and writes only `len`.
        let rv = Rv::from(unsafe {
            (op.call)(
                self.handle(),
                input.as_ptr() as *mut u8,
                input_len,
                std::ptr::null_mut(),
                &mut len,
            )
        });
        match rv {
            Rv::Ok => {}
            Rv::Error(RvError::BufferTooSmall) => return still_active,
            Rv::Error(_) => return Ok(()),
        }
        let Ok(size) = usize::try_from(len) else {
            return still_active;
        };
        let mut scratch = vec![0u8; size];
        // SAFETY: the token writes at most `len` (= `scratch.len()`) bytes to `scratch`.
        let rv = Rv::from(unsafe {
            (op.call)(
                self.handle(),
                input.as_ptr() as *mut u8,
                input_len,
                scratch.as_mut_ptr(),
                &mut len,
            )
        });
        scratch.zeroize();
        if rv == Rv::Error(RvError::BufferTooSmall) {
            return still_active;
        }
        Ok(())
    }
}

/// Replaces `out` with a zeroed buffer of `len` bytes, erasing the old one (a reallocation
/// would leave its contents behind).
fn regrow(out: &mut Vec<u8>, len: usize) {
    out.zeroize();
    *out = vec![0; len];
}

impl Session {
    /// [`Session::get_attributes`] in one `C_GetAttributeValue` call when every value fits: an
    /// attribute of variable size gets a buffer of `variable_capacity` bytes instead of a
    /// length query first (upstream always makes two calls when any attribute has a variable
    /// size, and SoftHSM2 re-reads the object's file for each). When a value does not fit —
    /// `CKR_BUFFER_TOO_SMALL`, or a variable-size attribute reported unavailable beside another
    /// error, which a token may answer instead — the read is made again by
    /// [`Session::get_attributes`]. Attributes the token does not give (sensitive, not part of
    /// the object) are left out, as there.
    pub fn get_attributes_sized(
        &self,
        object: ObjectHandle,
        attributes: &[AttributeType],
        variable_capacity: usize,
    ) -> Result<Vec<Attribute>> {
        // See get_attributes: an attribute array cannot be read back through this crate.
        if attributes.contains(&AttributeType::UnwrapTemplate) {
            return Err(Error::NotSupported);
        }
        let mut buffers: Vec<Vec<u8>> = attributes
            .iter()
            .map(|a| vec![0u8; a.fixed_size().unwrap_or(variable_capacity)])
            .collect();
        let mut template = Vec::with_capacity(attributes.len());
        for (a, b) in attributes.iter().zip(buffers.iter_mut()) {
            template.push(CK_ATTRIBUTE {
                type_: (*a).into(),
                pValue: if b.is_empty() {
                    std::ptr::null_mut()
                } else {
                    b.as_mut_ptr().cast()
                },
                ulValueLen: b.len().try_into()?,
            });
        }
        // SAFETY: `template` holds `template.len()` attributes, each pointing to a buffer of
        // `buffers` (alive until the end of this function) of exactly its `ulValueLen` bytes, or
        // NULL with a length of 0; the token writes at most that many bytes into each.
        let rv = unsafe {
            Rv::from(get_pkcs11!(self.client(), C_GetAttributeValue)(
                self.handle(),
                object.handle(),
                template.as_mut_ptr(),
                template.len().try_into()?,
            ))
        };
        let partial = match rv {
            Rv::Ok => false,
            Rv::Error(RvError::AttributeSensitive) | Rv::Error(RvError::AttributeTypeInvalid) => {
                true
            }
            Rv::Error(RvError::BufferTooSmall) => return self.get_attributes(object, attributes),
            _ => return rv.into_result(Function::GetAttributeValue).map(|_| Vec::new()),
        };
        let mut out = Vec::with_capacity(attributes.len());
        for ((a, t), b) in attributes.iter().zip(&template).zip(&buffers) {
            if t.ulValueLen == CK_UNAVAILABLE_INFORMATION {
                // Beside another error, "unavailable" may also mean "did not fit".
                if partial && a.fixed_size().is_none() {
                    return self.get_attributes(object, attributes);
                }
                continue;
            }
            if usize::try_from(t.ulValueLen)? > b.len() {
                // A token that reports the size it needs without saying the buffer was small.
                return self.get_attributes(object, attributes);
            }
            out.push((*t).try_into()?);
        }
        Ok(out)
    }
}
